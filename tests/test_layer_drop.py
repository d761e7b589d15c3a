"""LayerDrop (a residual block skipped whole at random per batch): a block that no observed
step happened to run is not an unused one (TL505) where that may be chance."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class ScriptedDrop(nn.Module):
    """A residual MLP of four blocks; ``runs[i]`` says at which of its training forwards block
    i runs (LayerDrop's coin, scripted so the test does not rest on a seed)."""

    def __init__(self, runs: list) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32), nn.ReLU(),
                                                  nn.Linear(32, 32)) for _ in runs)
        self.out = nn.Linear(32, 4)
        self.runs, self.calls = runs, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block, runs in zip(self.blocks, self.runs):
            if self.calls in runs:
                h = h + block(h)
        self.calls += 1
        return self.out(h)


def _tl505(runs: list) -> list:
    torch.manual_seed(0)
    batch = (torch.randn(16, 12), torch.randint(0, 4, (16,)))
    report = trainlint.check(ScriptedDrop(runs), batch, loss_fn=F.cross_entropy, steps=3,
                             optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    return [f.module for f in report.findings if f.code == "TL505"]


def test_a_block_layer_drop_skipped_at_every_step_of_a_check_is_not_unused() -> None:
    """Siblings run at 2, 1 and 2 of the 3 steps: a skip rate of 4/9, and some block of four
    goes without at all three with a chance of 0.30 (block 0 here)."""
    assert _tl505([(), (0, 1), (2,), (0, 2)]) == []


def test_a_block_the_loop_never_reaches_is_unused() -> None:
    """The same model whose siblings run at every step: block 0 is left out by the loop."""
    assert _tl505([(), (0, 1, 2), (0, 1, 2), (0, 1, 2)]) == ["blocks.0"]
