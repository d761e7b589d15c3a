"""A Monitor's ``fail_on`` stops a run mid-way: TL603 (the loss does not go down) judges there
only once enough of the run was seen, since healthy runs sit on a plateau first; a loss that
cannot fall still stops the run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from trainlint.rules.run import INTERIM_STEPS

import trainlint

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VOCAB, PAD, BOS, LENGTH = 40, 0, 1, 12


class Seq2Seq(nn.Module):
    """A GRU encoder-decoder: its loss sits near ln(40) for ~60 steps, then falls."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32, padding_idx=PAD)
        self.enc, self.dec = nn.GRU(32, 64, batch_first=True), nn.GRU(32, 64, batch_first=True)
        self.out = nn.Linear(64, VOCAB)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        _, h = self.enc(self.emb(src))
        return self.out(self.dec(self.emb(tgt_in), h)[0])


def _reverse_task(g: torch.Generator, batch: int = 32) -> tuple:
    """Padded sequences and their reversal as targets (padding ignored by the loss)."""
    n = torch.randint(4, LENGTH + 1, (batch,), generator=g)
    src = torch.randint(2, VOCAB, (batch, LENGTH), generator=g)
    src = src.masked_fill(torch.arange(LENGTH)[None] >= n[:, None], PAD)
    tgt = torch.stack([torch.cat([s[s != PAD].flip(0), s[s == PAD]]) for s in src])
    return src, torch.cat([torch.full((batch, 1), BOS), tgt[:, :-1]], 1), tgt


def test_a_healthy_plateau_at_the_start_does_not_stop_the_run() -> None:
    """Measured: stopped at step 50 (every=10) as 'the loss barely fell' (-1.4%) while the
    loss went on to fall from 3.69 to 2.1 by step 300."""
    torch.manual_seed(0)
    model = Seq2Seq()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(16)
    losses = []
    with trainlint.Monitor(model, opt, every=10, fail_on="warning") as monitor:
        for _ in range(INTERIM_STEPS + 20):
            src, tgt_in, tgt = _reverse_task(g)
            loss = F.cross_entropy(model(src, tgt_in).reshape(-1, VOCAB), tgt.reshape(-1),
                                   ignore_index=PAD)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
            losses.append(loss.item())
    assert sum(losses[:10]) / 10 > 1.1 * sum(losses[-10:]) / 10  # it learned


def test_a_loss_that_cannot_fall_still_stops_the_run() -> None:
    """Labels drawn apart from the inputs (the TL603 fixture): stopped once INTERIM_STEPS of
    the run were seen."""
    spec = importlib.util.spec_from_file_location("fixture", FIXTURES / "loss_not_decreasing.py")
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    torch.manual_seed(0)
    model = fixture.build_model()
    opt = fixture.build_optimizer(model.parameters())
    with trainlint.Monitor(model, opt, every=10, fail_on="warning") as monitor:
        with pytest.raises(trainlint.RunFailed) as failed:
            fixture.train(model, opt, monitor, 3 * INTERIM_STEPS)
    assert [f.code for f in failed.value.report.failing("warning")] == ["TL603"]
    assert INTERIM_STEPS <= monitor.steps_seen <= INTERIM_STEPS + 20
