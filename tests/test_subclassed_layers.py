"""Subclasses of torch.nn layers (timm's BatchNormAct2d, detectron2's NaiveSyncBatchNorm, a
project's own ReLU) are the layers they derive from: the rules recognise them, and the reports
still show the user's class name."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trainlint
from trainlint.assemble import torch_base


class MyBatchNorm2d(nn.BatchNorm2d):
    pass


class MyConv2d(nn.Conv2d):
    pass


class MyReLU(nn.ReLU):
    pass


class Block(nn.Module):
    pass


def test_torch_base_is_the_nearest_torch_nn_class() -> None:
    assert torch_base(MyBatchNorm2d) == "BatchNorm2d"
    assert torch_base(nn.BatchNorm2d) == "BatchNorm2d"
    assert torch_base(Block) == "Block"  # derives from nn.Module only
    assert torch_base(nn.Module) == "Module"


def _net(conv: type, norm: type, relu: type) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(conv(3, 16, 3, padding=1), norm(16), relu(), nn.Flatten(),
                        nn.Linear(16 * 8 * 8, 10))
    with torch.no_grad():
        net[1].bias[:12] = -20.0  # 12 of the 16 channels never pass the ReLU
    return net


@pytest.mark.parametrize("subclassed", [False, True])
def test_subclassed_layers_get_the_findings_of_their_bases(subclassed: bool) -> None:
    classes = (MyConv2d, MyBatchNorm2d, MyReLU) if subclassed else (nn.Conv2d, nn.BatchNorm2d,
                                                                    nn.ReLU)
    batch = (torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    report = trainlint.check(_net(*classes), batch, steps=2)
    where = {(f.code, f.module) for f in report.findings}
    assert {("TL401", "1"), ("TL403", "0"), ("TL101", "2")} <= where
    types = {lt.module: lt.type for lt in report.trace.layers}
    assert types["1"] == classes[1].__name__  # shown as the user's class
    dead = next(f for f in report.findings if f.code == "TL101")
    assert dead.evidence["dead_fraction"] == pytest.approx(0.75)
