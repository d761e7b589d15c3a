"""ResNets whose residual branches end in a BatchNorm with its scale at 0 (torchvision's
``zero_init_residual``, timm's ``zero_init_last``): at first every branch adds nothing, so
its layers get no gradient and make no update, by design. No vanishing-gradient,
update-ratio or vanishing-activation finding may come of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from trainlint.rules._graph import quiet_branches

import trainlint


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN, added to the input; the sum written one of several ways."""

    def __init__(self, channels: int, style: int, zero_init: bool) -> None:
        super().__init__()
        self.style = style
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(channels)
        self.c2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(channels)
        for conv in (self.c1, self.c2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if zero_init:
            nn.init.zeros_(self.b2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        if self.style == 0:
            out = x + out
        elif self.style == 1:
            out = torch.add(x, out)
        else:
            out = out * 1.0 + x
        return torch.relu(out)


def resnet(zero_init: bool) -> nn.Module:
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU())
    blocks = nn.Sequential(*[Block(16, i % 3, zero_init) for i in range(6)])
    return nn.Sequential(stem, blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.mark.parametrize("steps", [3, 10])
def test_zero_initialized_residual_branches_are_no_fault(steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    report = trainlint.check(resnet(zero_init=True), batch, steps=steps)  # SGD lr 0.01
    assert quiet_branches(report.trace) == [f"1.{i}" for i in range(6)]
    branch = [p for p in report.trace.params if p.name == "1.0.c1.weight"][0]
    assert branch.update_ratios[0] == 0  # no gradient reached it at step 0
    assert not {f.code for f in report.findings} & {"TL103", "TL501", "TL502", "TL503"}
    plain = trainlint.check(resnet(zero_init=False), batch, steps=steps)
    assert quiet_branches(plain.trace) == []


def test_norm_scales_all_zeroed_are_no_quiet_branch() -> None:
    """An init that zeroes every BatchNorm scale (the stem's and each branch's first too)
    quiets the main path: no block is left out, and the dead signal is found."""
    model = resnet(zero_init=False)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.zeros_(module.weight)
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    report = trainlint.check(model, batch, steps=3)
    assert quiet_branches(report.trace) == []
    assert {"TL101", "TL501"} <= {f.code for f in report.findings}
