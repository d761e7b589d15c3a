"""A ReLU applied to the batch itself (meant to clip negatives) on features that are all
negative: every unit dead from the start. The units are the input's: TL101's fix is the data,
not an init of a layer that does not exist (measured: LeakyReLU, the old fix, left the loss at
1.54 against 0.03 with standardized inputs)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class ClipsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.relu(x))


def test_dead_units_of_a_relu_on_the_input_point_at_the_input() -> None:
    torch.manual_seed(0)
    x = -5 + 0.7 * torch.randn(64, 40)  # log-power features: all negative
    report = trainlint.check(ClipsInput(), (x.clamp(max=-1), torch.randint(0, 5, (64,))))
    [found] = [f for f in report.findings if f.code == "TL101"]
    assert found.module == "" and found.evidence["input"] == "input0"
    assert "standardize the inputs" in found.fix and "kaiming" not in found.fix
