"""TL101 behind a layer that takes an input TL201 flags: the input's offset, not the init, sets
each unit's sign, so the fix standardizes the input first."""

from __future__ import annotations

import torch
import torch.nn as nn

import trainlint


def _dead_finding(x: torch.Tensor, bias: float = 0.0):
    """TL101's finding (or None) on an MLP whose first layer has 24 of its 32 units' weights
    negative and its biases at ``bias``, and the report."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        model[0].weight.abs_()[:24].neg_()
    nn.init.constant_(model[0].bias, bias)
    report = trainlint.check(model, (x, torch.randn(len(x), 1)), steps=1)
    return next((f for f in report.findings if f.code == "TL101"), None), report


def test_units_dead_behind_an_offset_input_are_fixed_by_standardizing_it() -> None:
    torch.manual_seed(1)
    prices = 300.0 + 80.0 * torch.randn(64, 2)
    found, report = _dead_finding(prices)
    assert "TL201" in {f.code for f in report.findings}
    assert found is not None and found.evidence["unnormalized_input"] == "input0"
    assert found.fix.startswith("the input of '0' is the model's input 'input0'")
    assert "standardize the input first" in found.fix


def test_the_same_units_live_on_the_standardized_input() -> None:
    torch.manual_seed(1)
    found, report = _dead_finding(torch.randn(64, 2))
    assert not {"TL101", "TL201"} & {f.code for f in report.findings}


def test_units_dead_behind_a_standardized_input_keep_the_init_fix() -> None:
    torch.manual_seed(1)
    found, report = _dead_finding(torch.randn(64, 2), bias=-4.0)
    assert "TL201" not in {f.code for f in report.findings}
    assert found is not None and "unnormalized_input" not in found.evidence
    assert found.fix.startswith("re-initialize the layer feeding it")
