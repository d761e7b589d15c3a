"""A residual sum joins two paths whichever side of the ``+`` each is on: a branch ending in
a norm layer with a small scale (zero-init-gamma style) reaches the sum as the right-hand
operand too, so TL301 does not judge its scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trainlint


class Block(nn.Module):
    """Linear -> BatchNorm (gamma 0.01) as a residual branch, added on the ``side`` given."""

    def __init__(self, side: str) -> None:
        super().__init__()
        self.side = side
        self.lin = nn.Linear(16, 16, bias=False)
        self.bn = nn.BatchNorm1d(16)
        nn.init.constant_(self.bn.weight, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn(self.lin(x))
        if self.side == "right":
            return torch.relu(x + branch)
        if self.side == "left":
            return torch.relu(branch + x)
        return torch.relu(branch)  # no skip: the small scale shrinks the signal


def _model(side: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Block(side), Block(side), nn.Linear(16, 3))


def _tl301(side: str) -> list:
    batch = torch.randn(64, 8), torch.randint(0, 3, (64,))
    report = trainlint.check(_model(side), batch, steps=1)
    return [f.module for f in report.findings if f.code == "TL301"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_small_scale_norm_ending_a_residual_branch_is_not_judged(side: str) -> None:
    assert _tl301(side) == []


def test_a_small_scale_norm_without_a_skip_is_judged() -> None:
    assert _tl301("none") == ["2.bn"]


def test_both_operands_of_a_sum_reach_it() -> None:
    batch = torch.randn(64, 8), torch.randint(0, 3, (64,))
    report = trainlint.check(_model("right"), batch, steps=1)
    sums = {(e.src[1], e.via) for e in report.trace.edges if e.dst[0] == "sum"}
    assert ("2.bn", ("add",)) in sums and ("1", ("add",)) in sums
