"""Parametrized weights (torch.nn.utils.parametrizations): reading a module's facts must not
run the parametrization, whose spectral_norm takes a power-iteration step on every read in
train mode and so changes the model's buffers."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import trainlint
from trainlint.assemble import module_attrs


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(weight_norm(nn.Linear(8, 16)), nn.ReLU(),
                         spectral_norm(nn.Linear(16, 3, bias=False)))


def _batch() -> tuple:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_check_leaves_a_spectral_norm_model_as_it_was() -> None:
    model = _model()
    before = _state(model)
    trainlint.check(model, _batch(), steps=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_monitor_report_does_not_step_spectral_norm() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _batch()
    with trainlint.Monitor(model, opt, every=1) as monitor:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
        before = _state(model)
        monitor.report()
        after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_facts_of_parametrized_layers() -> None:
    model = _model()
    first, last = module_attrs(model[0]), module_attrs(model[2])
    assert first["has_weight"] and first["has_bias"]
    assert last["has_weight"] and not last["has_bias"]
    assert "has_weight" not in module_attrs(model[1])


def test_a_parametrized_layer_is_observed_as_the_layer_it_is() -> None:
    """Its forward reads the weight, which runs the parametrization: the parametrization's
    output is that weight, not an activation. The layer's own output is the point."""
    model = _model()
    report = trainlint.check(model, _batch())
    layers = {lt.module: lt for lt in report.trace.layers}
    assert set(layers) == {"0", "1", "2"}
    assert layers["0"].type == "ParametrizedLinear" and layers["0"].base == "Linear"
    assert layers["2"].base == "Linear" and layers["2"].shape == (32, 3)
    assert layers["0"].grad_norm is not None
    modules = report.trace.modules
    assert modules["0"].is_leaf and not modules["0.parametrizations"].is_leaf


def test_raw_pixels_into_a_weight_norm_convolution_are_not_normalized() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv2d(3, 16, 3, padding=1)), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (32, 3, 16, 16), generator=g).float()
    batch = pixels, torch.randint(0, 10, (32,), generator=g)
    def tl201(batch: tuple) -> list:
        return [f.code for f in trainlint.check(model, batch).findings if f.code == "TL201"]

    assert tl201(batch) == ["TL201"]
    assert tl201(((pixels - 127.5) / 74.0, batch[1])) == []
