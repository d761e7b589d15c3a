"""Residual branches quieted by a small learned scale (ConvNeXt's and CaiT's layer scale at
1e-6, timm's ``LayerScale`` leaf, ReZero's 0): their layers' gradients are that small a share
of the stream's, by design. No vanishing-gradient or update-ratio finding may come of it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from trainlint.rules._graph import LAYER_SCALE, layer_scaled_branches

import trainlint


class LayerScale(nn.Module):
    """timm's leaf: the branch's output times a learned per-channel scale."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """ConvNeXt's: depthwise conv, LayerNorm, pointwise MLP, scaled, added to the input."""

    def __init__(self, dim: int, init: float, style: str) -> None:
        super().__init__()
        self.style = style
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if style == "leaf":
            self.ls = LayerScale(dim, init)
        else:  # a parameter of the block itself (ConvNeXt, transformers); ReZero's one scalar
            self.gamma = nn.Parameter(init * torch.ones(dim if style == "own" else ()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(nn.functional.gelu(self.pwconv1(self.norm(y))))
        y = self.ls(y) if self.style == "leaf" else self.gamma * y
        return x + y.permute(0, 3, 1, 2)


def convnext(init: float, style: str = "own") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.GroupNorm(1, 32),
                          nn.Sequential(*[Block(32, init, style) for _ in range(3)]),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(32),
                          nn.Linear(32, 10))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return model


def _batch() -> tuple:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)


def _check(model: nn.Module, optimizer) -> trainlint.Report:  # noqa: ANN001
    return trainlint.check(model, _batch(), optimizer=optimizer, steps=3)


@pytest.mark.parametrize("style, init", [("own", 1e-6), ("leaf", 1e-6), ("rezero", 0.0)])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_layer_scaled_branches_are_no_vanishing_gradient(style: str, init: float,
                                                         optimizer: str) -> None:
    def make(params):  # noqa: ANN001, ANN202
        if optimizer == "adamw":  # a fine-tuning rate: no update fade rescues the finding
            return torch.optim.AdamW(params, lr=5e-5, weight_decay=0.05)
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)

    model = convnext(init, style)
    # Measured directly: the branch's layers get a gradient ~init of the stream's.
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    stem, branch = model[0].weight.grad.norm(), model[2][0].pwconv2.weight.grad.norm()
    assert branch <= max(init, 1e-9) * 1e3 * stem
    model.zero_grad()
    report = _check(model, make)
    assert layer_scaled_branches(report.trace) == ["2.0", "2.1", "2.2"]
    assert not {f.code for f in report.findings} & {"TL501", "TL503"}


@pytest.mark.parametrize("edge, quiet", [(0.99, True), (1.01, False)])
def test_a_layer_scale_quiets_its_branch_up_to_the_bound(edge: float, quiet: bool) -> None:
    model = convnext(edge * LAYER_SCALE)
    report = _check(model, lambda p: torch.optim.AdamW(p, lr=5e-5))
    assert bool(layer_scaled_branches(report.trace)) is quiet
    assert math.isclose(model[2][0].gamma.detach().norm().item() / math.sqrt(32),
                        edge * LAYER_SCALE, rel_tol=1e-5)  # the check left it as it was


def test_a_small_scale_on_the_main_path_or_a_small_norm_weight_quiets_no_branch() -> None:
    """A scale leaf on the model's own path, or a norm of the user's own whose ``weight``
    starts small, makes the stream itself small: no block is left out."""
    torch.manual_seed(0)

    class OwnNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(1e-6 * torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    main = nn.Sequential(nn.Linear(8, 32), LayerScale(32, 1e-6), nn.ReLU(), nn.Linear(32, 32),
                         nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    batch = torch.randn(16, 8), torch.randint(0, 4, (16,))
    assert layer_scaled_branches(trainlint.check(main, batch, steps=2).trace) == []
    normed = nn.Sequential(nn.Linear(8, 32), nn.Sequential(OwnNorm(32), nn.Linear(32, 32)),
                           nn.ReLU(), nn.Linear(32, 4))
    assert layer_scaled_branches(trainlint.check(normed, batch, steps=2).trace) == []
    # A tiny gain on each block's only path (no skip around it) quiets the stream itself:
    # the vanishing gradient is reported.
    gains = nn.Sequential(nn.Linear(8, 32), *[nn.Sequential(nn.Linear(32, 32), LayerScale(32, 1e-4),
                                                            nn.ReLU()) for _ in range(6)],
                          nn.Linear(32, 4))
    report = trainlint.check(gains, batch, steps=2)
    assert layer_scaled_branches(report.trace) == []
    assert "TL501" in {f.code for f in report.findings}


class Shift(nn.Module):
    """ResMLP's Affine: a per-channel scale at 1 and shift at 0."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta


class ShiftedBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.affine = Shift(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sigmoid(self.affine(self.fc(x)))


def test_a_shift_at_zero_is_no_layer_scale() -> None:
    """A vector of zeros is a shift (ResMLP's Affine beta), added, not multiplied: it quiets
    no branch (ReZero's one scalar at 0 does)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), *[ShiftedBlock(16) for _ in range(4)],
                          nn.Linear(16, 4))
    report = trainlint.check(model, (torch.randn(16, 8), torch.randint(0, 4, (16,))), steps=2)
    assert layer_scaled_branches(report.trace) == []
