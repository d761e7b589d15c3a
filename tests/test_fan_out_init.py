"""torchvision's VGG/ResNet init (``kaiming_normal_(mode='fan_out')``) on a grayscale VGG: the
stem conv (1 -> 32 channels) starts at 0.18x its fan-in scale, and TL301 leaves it alone as
the known fan-out mode; the same net at ``normal_(std=0.01)`` is still reported."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

import trainlint


def _vgg(init: str) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10))
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            if init == "fan_out":
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
    return model


def _tl301(init: str) -> list:
    torch.manual_seed(0)
    model = _vgg(init)
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    return [f for f in trainlint.check(model, batch, steps=2).findings if f.code == "TL301"]


def test_a_grayscale_vgg_at_torchvisions_init_passes() -> None:
    stem = _vgg("fan_out")[0].weight
    ratio = stem.std().item() / (math.sqrt(2) / 3)  # fan-in 9
    assert ratio < 0.2  # below min_ratio by fan-in alone
    assert _tl301("fan_out") == []


def test_the_same_vgg_at_std_0_01_is_reported() -> None:
    found = _tl301("std")
    assert [f.module for f in found] == ["0"]
