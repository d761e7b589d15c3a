"""TL302 on a first loss that the last layer's bias makes large: the finding names the layer
behind the output's ``nn.Identity`` and blames the bias, which a direct computation confirms
(zeroing the bias brings the loss to ln 2; scaling the weights down does not)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class MultiLabel(nn.Module):
    def __init__(self, bias: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh())
        self.head = nn.Linear(128, 20)
        nn.init.constant_(self.head.bias, bias)
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.head(self.body(x)))


def _batch() -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g)
    return x, (x[:, :20] > 0.5).float()


def _loss(model: nn.Module) -> float:
    x, y = _batch()
    with torch.no_grad():
        return F.binary_cross_entropy_with_logits(model(x), y).item()


def test_a_large_output_bias_is_blamed_at_the_layer_that_holds_it() -> None:
    torch.manual_seed(0)
    model = MultiLabel(8.0)
    zeroed, shrunk = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        zeroed.head.bias.zero_()
        shrunk.head.weight.normal_(std=0.01)
    assert abs(_loss(zeroed) - math.log(2)) < 0.1 and _loss(shrunk) > 5.0  # the truth
    report = trainlint.check(model, _batch(),
                             loss_fn=lambda o, y: F.binary_cross_entropy_with_logits(o, y))
    [found] = [f for f in report.findings if f.code == "TL302"]
    assert found.module == "head"
    assert "'head.bias', RMS 8 at init" in found.fix
    assert "std=0.01" not in found.fix


def test_a_healthy_bias_is_not_reported() -> None:
    torch.manual_seed(0)
    report = trainlint.check(MultiLabel(0.0), _batch(),
                             loss_fn=lambda o, y: F.binary_cross_entropy_with_logits(o, y))
    assert [f for f in report.findings if f.code == "TL302"] == []
