"""A gradient of exactly 0 is a cut, not a fade (TL501): a factor at 0 that never trains,
held as a plain tensor or frozen, leaves everything behind it without a gradient for good."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class GatedAdapters(nn.Module):
    """A frozen MLP stack with Flamingo-style adapters x + tanh(alpha) * dense(x); ``alpha``
    an nn.Parameter at 0 (the design) or a plain tensor at 0 (the bug)."""

    def __init__(self, parameter: bool, depth: int = 4, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.base = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.dense = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU(),
                                                 nn.Linear(width, width)) for _ in range(depth))
        self.head = nn.Linear(width, 4)
        for m in (self.inp, self.base):
            m.requires_grad_(False)
        self.alpha = (nn.Parameter(torch.zeros(depth)) if parameter else torch.zeros(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for i, (base, dense) in enumerate(zip(self.base, self.dense)):
            h = h + torch.tanh(self.alpha[i]) * dense(h)
            h = torch.relu(base(h)) + h
        return self.head(h)


def _report(parameter: bool) -> trainlint.Report:
    torch.manual_seed(0)
    model = GatedAdapters(parameter)
    batch = (torch.randn(32, 16), torch.randint(0, 4, (32,)))
    return trainlint.check(model, batch, loss_fn=F.cross_entropy,
                           optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))


def test_a_gate_held_as_a_plain_tensor_cuts_the_adapters_gradient() -> None:
    report = _report(parameter=False)
    dense = [p for p in report.trace.params if p.name.startswith("dense.")]
    assert dense and all(p.grad_norm == 0 for p in dense)  # the truth: cut, exactly
    [found] = [f for f in report.findings if f.code == "TL501"]
    assert "exactly 0, not faded" in found.fix and "nn.Parameter" in found.fix


def test_the_same_gate_as_a_parameter_is_clean() -> None:
    report = _report(parameter=True)
    assert [f.code for f in report.findings if f.severity != "info"] == []
