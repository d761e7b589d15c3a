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


class DropPathBlock(nn.Module):
    """A residual block that skips its whole branch for the batch at the scripted calls
    (Huang et al.'s stochastic depth, as a ResNet's BasicBlock does it in its own forward)."""

    def __init__(self, skips: tuple) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
        self.skips, self.calls = skips, 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        skip = self.calls in self.skips
        self.calls += 1
        return h if skip else h + self.branch(h)


def _stage(skips: list) -> list:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32),
                          nn.Sequential(*[DropPathBlock(s) for s in skips]), nn.Linear(32, 4))
    batch = (torch.randn(16, 12), torch.randint(0, 4, (16,)))
    report = trainlint.check(model, batch, loss_fn=F.cross_entropy, steps=3,
                             optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    return [f.module for f in report.findings if f.code == "TL505"]


def test_stochastic_depth_in_a_sequential_stage_is_chance_too() -> None:
    """The blocks of a ResNet stage sit in an nn.Sequential: one whose branch was skipped at
    all three steps, beside siblings skipped at some, is not unused; one whose siblings never
    skip is."""
    assert _stage([(0, 1, 2), (1,), (0, 2), ()]) == []
    assert _stage([(0, 1, 2), (), (), ()]) == ["1.0"]


def test_stochastic_depth_is_judged_over_the_blocks_of_every_stage() -> None:
    """Two stages of two blocks: the second stage's last block skipped at all three steps
    while its sibling ran at every one; blocks of the first stage skipped at some. Over the
    four blocks of the class that may be chance (a ResNet stage of two says little alone)."""
    torch.manual_seed(0)
    stages = [nn.Sequential(DropPathBlock((0,)), DropPathBlock((1, 2))),
              nn.Sequential(DropPathBlock(()), DropPathBlock((0, 1, 2)))]
    model = nn.Sequential(nn.Linear(12, 32), *stages, nn.Linear(32, 4))
    batch = (torch.randn(16, 12), torch.randint(0, 4, (16,)))
    report = trainlint.check(model, batch, loss_fn=F.cross_entropy, steps=3,
                             optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    assert [f.module for f in report.findings if f.code == "TL505"] == []


class DropWithNeck(ScriptedDrop):
    """ScriptedDrop's blocks, skipped at random, and a neck of torch Linears that the forward
    never calls (the line that calls it forgotten)."""

    def __init__(self, runs: list) -> None:
        super().__init__(runs)
        self.neck = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))


def test_a_never_called_module_is_unused_beside_blocks_skipped_at_random() -> None:
    """The blocks' Linears skip at random; the neck's, of the same torch class, never run:
    torch's own classes are no stage's blocks, so chance does not cover the neck."""
    torch.manual_seed(0)
    batch = (torch.randn(16, 12), torch.randint(0, 4, (16,)))
    report = trainlint.check(DropWithNeck([(0, 1), (2,), (0, 2), (1, 2)]), batch,
                             loss_fn=F.cross_entropy, steps=3,
                             optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    assert [f.module for f in report.findings if f.code == "TL505"] == ["neck"]
