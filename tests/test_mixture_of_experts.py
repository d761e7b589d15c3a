"""A mixture of experts calls each expert only on the tokens its router sends it: an expert
sent none is not called and gets no gradient, by design, not by a wiring fault (TL505)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class TopOneMoE(nn.Module):
    """Token classifier over a top-1 routed mixture of ``experts`` feed-forward experts; an
    ``unused`` layer (built, never called) when asked for."""

    def __init__(self, experts: int = 16, unused: bool = False,
                 act: type = nn.GELU) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.router = nn.Linear(32, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), act(),
                                                   nn.Linear(64, 32)) for _ in range(experts))
        self.head = nn.Linear(32, 5)
        self.extra = nn.Linear(32, 32) if unused else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).reshape(-1, 32)
        weight, choice = self.router(h).softmax(-1).max(-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                out.index_add_(0, rows, expert(h[rows]) * weight[rows, None])
        return self.head(h + out)


def _batch() -> tuple:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 100, (2, 4), generator=g), torch.randint(0, 5, (8,), generator=g)


def _tl505(report: trainlint.Report) -> list:
    return [f for f in report.findings if f.code == "TL505"]


def test_experts_that_no_token_reached_are_not_unused_parameters() -> None:
    torch.manual_seed(0)
    report = trainlint.check(TopOneMoE(), _batch(), loss_fn=F.cross_entropy,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    ran = {lt.module.split(".")[1] for lt in report.trace.layers
           if lt.module.startswith("experts.")}
    assert 1 < len(ran) < 16  # 8 tokens, 16 experts: some were sent none
    assert _tl505(report) == []


def test_a_layer_built_and_never_called_beside_the_experts_is_still_unused() -> None:
    torch.manual_seed(0)
    report = trainlint.check(TopOneMoE(unused=True), _batch(), loss_fn=F.cross_entropy,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    assert [f.module for f in _tl505(report)] == ["extra"]


def test_an_expert_sent_one_token_per_step_is_no_dead_relu_layer() -> None:
    """An expert that ran on one token each step showed each unit 3 values: about half its
    ReLU units are off by chance (TL101 asks 90% there, as where samples are alike)."""
    torch.manual_seed(0)
    report = trainlint.check(TopOneMoE(act=nn.ReLU), _batch(), loss_fn=F.cross_entropy,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    single = [lt for lt in report.trace.layers if lt.kind == "relu" and lt.shape[0] == 1]
    assert single  # some experts ran on one token
    assert [f for f in report.findings if f.code == "TL101"] == []
