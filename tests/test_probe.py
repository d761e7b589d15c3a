"""What the probe observes: in-place ops, functional activations, odd outputs and inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint import stats
from trainlint.stats import SATURATION_LEVEL


def moments(tensors: list) -> dict:
    x = np.concatenate([t.detach().double().numpy().ravel() for t in tensors])
    return {"count": x.size, "mean": x.mean(), "std": x.std(), "min": x.min(), "max": x.max(),
            "zeros": int((x == 0).sum())}


def assert_matches(lt, tensors: list) -> None:
    d = moments(tensors)
    act = lt.activation
    assert act.count == d["count"], lt.label
    assert act.mean == pytest.approx(d["mean"], rel=1e-5, abs=1e-9), lt.label
    assert act.std == pytest.approx(d["std"], rel=1e-5), lt.label
    assert act.min == d["min"] and act.max == d["max"], lt.label
    assert round(act.zero_fraction * act.count) == d["zeros"], lt.label


def xent(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


# ------------------------------------------------------------------ in-place ReLU after BN

class BnInplace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 24)
        self.bn = nn.BatchNorm1d(24)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.fc(x))))


def test_inplace_relu_after_batchnorm_is_observed_correctly() -> None:
    torch.manual_seed(0)
    model = BnInplace()
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    report = trainlint.check(model, (x, y), loss_fn=xent, steps=1)
    layers = report.trace.layer_by_key()
    # Independent recomputation of the same step without in-place ops (the model is restored).
    pre = model.bn(model.fc(x))
    pre.retain_grad()
    post = torch.relu(pre)
    post.retain_grad()
    xent(model.head(post), y).backward()
    bn, act = layers[("bn", "output")], layers[("act", "output")]
    assert bn.activation.min < 0, "BN statistics must be taken before the in-place ReLU"
    assert_matches(bn, [pre])
    assert_matches(act, [post])
    assert act.dead_units == sorted(np.flatnonzero(~(post > 0).any(0).numpy()))
    assert bn.grad_norm == pytest.approx(float(pre.grad.norm()), rel=1e-5)
    assert act.grad_norm is None  # an activation inside the network: its gradient is not read


# ------------------------------------------------------------------ functional activations

class Mixer(nn.Module):
    """Every functional activation form, called inside this module's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple:
        h = F.relu(self.a(x))
        t = torch.tanh(self.b(h))
        return t.sigmoid(), t.relu()


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = Mixer()
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, r = self.mixer(x)
        return self.head(torch.cat([s, r], dim=1))


def test_functional_activations_are_attributed_to_the_calling_module() -> None:
    torch.manual_seed(1)
    model = FunctionalNet()
    x, y = torch.randn(8, 10), torch.randint(0, 4, (8,))
    report = trainlint.check(model, (x, y), loss_fn=xent, steps=1)
    layers = report.trace.layer_by_key()
    expected_kinds = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "relu#1": "relu"}
    found = {op: lt.kind for (module, op), lt in layers.items() if module == "mixer"}
    assert found == expected_kinds
    with torch.no_grad():
        h = F.relu(model.mixer.a(x))
        t = torch.tanh(model.mixer.b(h))
        computed = {"relu": h, "tanh": t, "sigmoid": t.sigmoid(), "relu#1": t.relu()}
    for op, value in computed.items():
        lt = layers[("mixer", op)]
        assert lt.type == "Mixer" and lt.label == f"mixer:{op}"
        assert_matches(lt, [value])
    tanh = layers[("mixer", "tanh")]
    assert round(tanh.activation.saturated_fraction * tanh.activation.count) == int(
        (t.abs() > 0.99).sum())
    relu = layers[("mixer", "relu")]
    assert relu.dead_units == sorted(np.flatnonzero(~(h > 0).any(0).numpy()))
    assert [lt.depth for lt in report.trace.ordered_layers()] == sorted(
        lt.depth for lt in report.trace.layers)


def test_functional_activation_inside_activation_module_is_not_double_counted() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Tanh(), nn.Linear(8, 2))
    report = trainlint.check(model, (torch.randn(4, 4), torch.randint(0, 2, (4,))), steps=1)
    assert sorted(k for k in report.trace.layer_by_key()) == [
        ("0", "output"), ("1", "output"), ("2", "output"), ("3", "output")]


# ------------------------------------------------------------------ outputs and inputs

@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class Shaped(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(6, 12)
        self.act = nn.ReLU()
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> object:
        h = self.act(self.body(x))
        logits = self.head(h)
        if self.kind == "tuple":
            return logits, h
        if self.kind == "dict":
            return {"logits": logits, "hidden": h}
        return Output(logits=logits, hidden=h)


@pytest.mark.parametrize("kind", ["tuple", "dict", "dataclass"])
def test_models_returning_tuples_dicts_and_dataclasses(kind: str) -> None:
    torch.manual_seed(2)
    model = Shaped(kind)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    report = trainlint.check(model, (x, y), steps=2)
    layers = report.trace.layer_by_key()
    assert set(layers) == {("body", "output"), ("act", "output"), ("head", "output")}
    assert report.trace.loss_kind == "cross_entropy" and len(report.trace.losses) == 2
    assert layers[("head", "output")].grad_norm > 0
    head_nodes = [origin for origin, _via in report.trace.output_ops]
    assert layers[("head", "output")].node in head_nodes


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc(self.embed(ids))))


def test_integer_token_ids_into_an_embedding() -> None:
    torch.manual_seed(3)
    model = Tokens()
    ids = torch.randint(0, 50, (4, 7))
    report = trainlint.check(model, (ids, torch.randint(0, 50, (4, 7))), steps=2)
    layers = report.trace.layer_by_key()
    embed = layers[("embed", "output")]
    assert embed.activation.count == 2 * 4 * 7 * 16
    with torch.no_grad():
        first = model.embed(ids)
    assert embed.activation.min <= float(first.min())
    assert layers[("", "gelu")].kind == "gelu" and layers[("", "gelu")].unit_dim == -1
    assert report.trace.inputs == []  # integer ids are not a float input to describe
    assert report.trace.batch_size == 4
    assert all(math.isfinite(lt.grad_norm) for lt in report.trace.layers if lt.kind is None)
    assert report.trace.params[0].name == "embed.weight" and report.trace.params[0].grad_norm > 0


class Keyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(features)) * mask)


def test_dict_inputs_are_passed_as_keywords() -> None:
    torch.manual_seed(4)
    model = Keyword()
    features = torch.randn(10, 5)
    mask = (torch.arange(8) % 2).float().expand(10, 8)
    report = trainlint.check(model, ({"features": features, "mask": mask},
                                     torch.randint(0, 2, (10,))), steps=1)
    layers = report.trace.layer_by_key()
    with torch.no_grad():
        relu = torch.relu(model.fc(features))
    assert_matches(layers[("", "relu")], [relu])
    inputs = {i.name: i for i in report.trace.inputs}
    assert set(inputs) == {"features", "mask"} and report.trace.batch_size == 10
    np.testing.assert_allclose(inputs["features"].mean, features.double().mean(0).numpy(),
                               rtol=1e-6)


class Hard(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.gate = nn.Linear(6, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.hardtanh(self.fc(x)) + F.hardsigmoid(self.gate(x)))


def test_functional_hardtanh_and_hardsigmoid_are_observed_with_their_family() -> None:
    torch.manual_seed(0)
    model = Hard()
    x = 10 * torch.randn(32, 6)
    report = trainlint.check(model, (x, torch.randint(0, 2, (32,))), steps=1)
    layers = report.trace.layer_by_key()
    tanh, sigmoid = layers[("", "tanh")], layers[("", "sigmoid")]
    assert (tanh.kind, sigmoid.kind) == ("tanh", "sigmoid")
    with torch.no_grad():
        expected = (F.hardtanh(model.fc(x)).abs() > SATURATION_LEVEL).double().mean().item()
    assert tanh.activation.saturated_fraction == pytest.approx(expected)


class WideClips(nn.Module):
    """Hardtanh clipping at +-3 (a module and a call): most values sit above a tanh's
    saturation level (SATURATION_LEVEL) without
    being clipped, so they are no tanh's saturated units."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.clip, self.head = nn.Linear(6, 16), nn.Hardtanh(-3.0, 3.0), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.hardtanh(self.clip(self.fc(x)), min_val=-3.0, max_val=3.0))


def test_a_hardtanh_with_other_bounds_is_not_judged_as_a_tanh() -> None:
    torch.manual_seed(0)
    model = WideClips()
    x = 4 * torch.randn(64, 6)
    report = trainlint.check(model, (x, torch.randint(0, 2, (64,))), steps=2)
    with torch.no_grad():
        out = model.fc(x)
    assert (out.abs() > SATURATION_LEVEL).float().mean() > 0.5 > (out.abs() >= 3.0).float().mean()
    assert {lt.kind for lt in report.trace.layers} == {None}
    assert not [f for f in report.findings if f.code == "TL102"]


class Clamped(nn.Module):
    """A hand-written ReLU, ``clamp`` at 0, written one of several ways."""

    def __init__(self, clamp: Callable[[torch.Tensor], torch.Tensor], bias: float) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(6, 16), nn.Linear(16, 2)
        nn.init.constant_(self.fc.bias, bias)
        self.clamp = clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.clamp(self.fc(x)))


RELU_CLAMPS = {
    "clamp(min=0)": lambda h: h.clamp(min=0),
    "torch.clamp(h, 0, 6)": lambda h: torch.clamp(h, 0, 6),
    "clamp_min(0)": lambda h: h.clamp_min(0.0),
    "clip_(min=0)": lambda h: h.clone().clip_(min=0),
    "F.threshold(h, 0, 0)": lambda h: F.threshold(h, 0.0, 0.0),
}


@pytest.mark.parametrize("how", sorted(RELU_CLAMPS))
def test_a_clamp_at_zero_is_observed_as_a_relu_and_its_dead_units_found(how: str) -> None:
    torch.manual_seed(0)
    model = Clamped(RELU_CLAMPS[how], bias=-8.0)
    x = torch.randn(32, 6)
    with torch.no_grad():
        assert (model.fc(x) <= 0).all()  # every unit is dead
    report = trainlint.check(model, (x, torch.randint(0, 2, (32,))), steps=1)
    relu = report.trace.layer_by_key()[("", "relu")]
    assert relu.kind == "relu" and relu.dead_fraction == 1.0
    assert [f.module for f in report.findings if f.code == "TL101"] == [""]


NOT_RELU_CLAMPS = {
    "clamp(min=1e-3)": lambda h: h.clamp(min=1e-3),
    "clamp(-1, 1)": lambda h: h.clamp(-1, 1),
    "clamp(max=0)": lambda h: h.clamp(max=0),
    "clamp(min=0, max=0)": lambda h: h.clamp(0, 0),
    "clamp(0, 31): a coordinate in an image": lambda h: h.clamp(0, 31),
    "clamp(min=zero tensor)": lambda h: h.clamp(min=torch.zeros(())),
    "F.threshold(h, 0, -1)": lambda h: F.threshold(h, 0.0, -1.0),
}


@pytest.mark.parametrize("how", sorted(NOT_RELU_CLAMPS))
def test_other_clamps_are_no_relu(how: str) -> None:
    torch.manual_seed(0)
    model = Clamped(NOT_RELU_CLAMPS[how], bias=-8.0)
    report = trainlint.check(model, (torch.randn(32, 6), torch.randint(0, 2, (32,))), steps=1)
    assert {lt.kind for lt in report.trace.layers} == {None}
    assert not [f for f in report.findings if f.code == "TL101"]


class Shared(nn.Module):
    """One Linear applied twice per forward: its statistics merge both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(torch.relu(self.fc(x))))


def test_a_module_called_twice_merges_both_calls_over_steps() -> None:
    torch.manual_seed(5)
    model = Shared()
    outs: list = []
    handle = model.fc.register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))
    try:
        report = trainlint.check(model, (torch.randn(9, 6) * 4 + 1, torch.randint(0, 2, (9,))),
                                 steps=3)
    finally:
        handle.remove()
    assert len(outs) == 6
    fc = report.trace.layer_by_key()[("fc", "output")]
    assert_matches(fc, outs)


class BasicBlock(nn.Module):
    """torchvision's ResNet block: one nn.ReLU module after bn1 and after the residual sum."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)) + x)
        return self.head(out.mean((2, 3)))


def test_each_call_of_an_activation_module_is_its_own_point() -> None:
    """The dead channels behind bn1 are not hidden by the live ones after the residual sum."""
    torch.manual_seed(0)
    block = BasicBlock()
    with torch.no_grad():
        block.bn1.bias[:6] = -20.0
    report = trainlint.check(block, (torch.randn(8, 8, 6, 6), torch.randint(0, 3, (8,))),
                             steps=2)
    points = report.trace.layer_by_key()
    first, second = points[("relu", "output")], points[("relu", "output#1")]
    assert first.dead_fraction == pytest.approx(6 / 8)
    assert second.dead_fraction < 0.5
    dead = [f for f in report.findings if f.code == "TL101"]
    assert [f.module for f in dead] == ["relu"]
    assert "bn1" in dead[0].fix


class Tower(nn.Module):
    """A Siamese net's shared tower: Linear -> ReLU (a module, or ``F.relu``) -> Linear."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.fc = nn.Linear(16, 64)
        self.relu = nn.ReLU()
        self.out = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(x)) if self.functional else self.relu(self.fc(x)))


class Siamese(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.tower = Tower(functional)

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple:
        return self.tower(a), self.tower(b), self.tower(c)


@pytest.mark.parametrize("functional", [False, True])
def test_calls_of_a_shared_tower_are_one_point(functional: bool) -> None:
    """The tower runs once per input: its ReLU's units are the same units in each call (fed by
    the same Linear), so a unit is dead only if no call's samples make it fire. Anchors and
    the others differ in sign, and many units fire for one kind only."""
    torch.manual_seed(0)
    model = Siamese(functional)
    with torch.no_grad():
        model.tower.fc.bias.fill_(-1.0)
    g = torch.Generator().manual_seed(0)
    a, b, c = (sign * (1 + torch.randn(32, 16, generator=g).abs()) for sign in (1, -1, -1))
    fired = torch.zeros(64, dtype=torch.bool)
    per_call = []
    with torch.no_grad():
        for x in (a, b, c):
            active = (model.tower.fc(x) > 0).any(0)
            per_call.append(1 - active.float().mean().item())
            fired |= active
    loss = nn.TripletMarginLoss(margin=0.2)
    report = trainlint.check(model, ((a, b, c), torch.zeros(32)), loss_fn=lambda o, _: loss(*o),
                             steps=1)
    op = "relu" if functional else "output"
    points = [lt for lt in report.trace.layers if lt.module in ("tower", "tower.relu")
              and lt.op.startswith(op)]
    assert len(points) == 1, [lt.op for lt in points]
    assert points[0].dead_fraction == pytest.approx(1 - fired.float().mean().item())
    assert min(per_call) > 0.5 > points[0].dead_fraction  # each call alone looks dead
    assert [f for f in report.findings if f.code == "TL101"] == []


class GatedConv(nn.Module):
    """A conv map gated by a squeeze-excitation made of nn.Linear, then ReLU; and a ConvNeXt
    style channels-last MLP (permute, Linear, GELU) on the same map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(12, 4), nn.Linear(4, 12)
        self.pw = nn.Linear(12, 20)
        self.head = nn.Linear(20, 3)
        with torch.no_grad():
            self.conv.bias[:9] = -50.0  # 9 of the 12 channels never pass the ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
        h = F.relu(h * gate[:, :, None, None])
        h = F.gelu(self.pw(h.permute(0, 2, 3, 1)))  # (N, H, W, 20): units in the last dim
        return self.head(h.mean((1, 2)))


def test_the_unit_dim_follows_the_layer_that_made_the_tensor() -> None:
    """After the SE gate's Linear, the ReLU on the conv map still has the conv's channels as
    units (dim 1); the GELU after a Linear on the permuted map has the Linear's (last dim)."""
    torch.manual_seed(0)
    report = trainlint.check(GatedConv(), (torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))),
                             steps=2)
    points = report.trace.layer_by_key()
    relu, gelu = points[("", "relu#1")], points[("", "gelu")]
    assert (relu.unit_dim, relu.unit_ever_active.size) == (1, 12)
    assert relu.dead_fraction == pytest.approx(9 / 12)
    assert (gelu.unit_dim, gelu.unit_ever_active.size) == (-1, 20)


class Tanhs(nn.Module):
    """Saturated tanh layers (weights N(0, 1)) scaled by a number, masked by a padding mask,
    and one used as a gate on features."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc = nn.Linear(16, 64)
        self.gate = nn.Linear(16, 64)
        self.head = nn.Linear(64, 3)
        nn.init.normal_(self.fc.weight, std=1.0)
        nn.init.normal_(self.gate.weight, std=1.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.how == "scaled":
            h = 1.7159 * torch.tanh(self.fc(x))
        elif self.how == "masked":
            h = torch.tanh(self.fc(x)) * mask.unsqueeze(-1).float()
        else:  # gated: tanh(gate) multiplies the features (as in an LSTM's output gate)
            h = torch.tanh(self.gate(x)) * self.fc(x)
        return self.head(h.mean(1))


@pytest.mark.parametrize("how, gate", [("scaled", False), ("masked", False), ("gated", True)])
def test_a_scaled_or_masked_tanh_is_no_gate(how: str, gate: bool) -> None:
    """A tanh times a number or a padding mask is no gate; one that multiplies features is.
    All three saturate at init (weights N(0, 1)) and a check reports each (TL102 judges a
    gate from the init, where a healthy one sits near 0)."""
    torch.manual_seed(0)
    mask = torch.ones(16, 10, dtype=torch.bool)
    mask[:, 7:] = False
    batch = ((torch.randn(16, 10, 16) * 3, mask), torch.randint(0, 3, (16,)))
    report = trainlint.check(Tanhs(how), batch, steps=1)
    tanh = next(lt for lt in report.trace.layers if lt.kind == "tanh")
    gated = any(e.src == tanh.node and e.dst[0] == "op" for e in report.trace.edges)
    assert gated is gate
    assert any(f.code == "TL102" for f in report.findings)


@pytest.mark.parametrize("tail", ["module", "functional", "reshaped"])
def test_the_gradient_at_an_output_activation_is_read_and_inside_the_network_not(tail):
    """The gradient at an activation's output is the next layer's input gradient, and is not
    read (the layers' output gradients make the profile); at the model's output (a generator's
    tanh), through reshapes, it is the loss's gradient and is read."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8)
            self.tanh = nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.out(self.act(self.fc(x)))
            if tail == "functional":
                return torch.tanh(y)
            y = self.tanh(y)
            return y.view(-1, 2, 4).transpose(1, 2) if tail == "reshaped" else y

    torch.manual_seed(0)
    model, x = Net(), torch.randn(5, 6)
    target = torch.randn(5, 8) if tail != "reshaped" else torch.randn(5, 4, 2)
    report = trainlint.check(model, (x, target), loss_fn=lambda out, y: (out - y).square().sum(),
                             steps=1)
    layers = report.trace.layer_by_key()
    with torch.no_grad():
        y = torch.tanh(model.out(torch.relu(model.fc(x))))  # restored to the state before
    expected = float((2 * (y.view_as(target) if tail != "reshaped"
                           else y.view(-1, 2, 4).transpose(1, 2)) - 2 * target).norm())
    key = ("", "tanh") if tail == "functional" else ("tanh", "output")
    assert layers[key].grad_norm == pytest.approx(expected, rel=1e-5)
    assert layers[("act", "output")].grad_norm is None
    assert layers[("fc", "output")].grad_norm > 0


def test_nonfinite_weight_is_exact_even_where_no_output_shows_it():
    """An Inf in an embedding row the batch never looks up is still a non-finite parameter."""
    embedding = nn.Embedding(4096, 16)  # above the sampling size: the norm/std are estimated
    with torch.no_grad():
        embedding.weight[4095, 3] = float("inf")
    model = nn.Sequential(embedding, nn.Flatten(), nn.Linear(16 * 4, 3))
    batch = (torch.randint(0, 10, (8, 4)), torch.randint(0, 3, (8,)))
    report = trainlint.check(model, batch)
    flagged = {p.name for p in report.trace.params if p.nonfinite}
    assert flagged == {"0.weight"}
    assert any(f.code == "TL504" and "0.weight" in f.message for f in report.findings)


@pytest.mark.parametrize("name", ["0.bias", "0.weight", "2.weight"])
def test_a_nonfinite_value_the_update_writes_is_seen_whatever_the_parameters_size(name):
    """A parameter of up to SAMPLE_ABOVE elements is read whole (in the optimizer's sample
    after its step), a larger one in full apart from its sample: a NaN the step writes where
    no sample looks is seen either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2048))
    target = dict(model.named_parameters())[name]
    assert (target.numel() > stats.SAMPLE_ABOVE) is (name == "2.weight")
    unsampled = sorted(set(range(target.numel())) - set(stats.sample_positions(target).tolist()))
    at = unsampled[0] if unsampled else target.numel() - 1

    torch.optim.SGD([nn.Parameter(torch.zeros(1))])  # SGD.step patched: its hooks run inside
    # the subclass's step, before the NaN is written (as after any SGD made earlier)

    class Poisoning(torch.optim.SGD):
        def step(self, closure=None):  # noqa: ANN001, ANN202
            out = super().step(closure)
            with torch.no_grad():
                target.view(-1)[at] = float("nan")
            return out

    optimizer = Poisoning(model.parameters(), lr=0.01)
    monitor = trainlint.Monitor(model, optimizer=optimizer, every=1)
    loss = model(torch.randn(4, 8)).square().mean()
    loss.backward()
    optimizer.step()
    monitor.step(loss)
    report = monitor.report()
    monitor.close()
    assert {p.name for p in report.trace.params if p.nonfinite} == {name}


def test_parameter_norms_are_exact_when_small_and_estimated_within_error_when_large():
    """Weights up to SAMPLE_ABOVE elements: exact norm; larger: the sample's sum of squares
    scaled to the whole (relative error of the norm about sqrt((kurtosis - 1) / 4m))."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    big = model[2].weight  # 32768 elements: sampled
    assert big.numel() > trainlint.stats.SAMPLE_ABOVE >= model[0].weight.numel()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(model(torch.randn(16, 32)), torch.randint(0, 10, (16,)))
            loss.backward()
            opt.step()
            monitor.step(loss)
        params = {p.name: p for p in monitor.report().trace.params}
    for name, p in model.named_parameters():
        truth = p.detach().double().norm().item()
        got = params[name].norm
        if p.numel() <= trainlint.stats.SAMPLE_ABOVE:
            assert got == pytest.approx(truth, rel=1e-9), name
        else:
            m = trainlint.stats.SAMPLE_TARGET
            assert got == pytest.approx(truth, rel=5 * math.sqrt(2 / (4 * m))), name


# ------------------------------------------------------------------ data flow through leaves

class FlowMix(nn.Module):
    """torch.nn leaves the probe's mode skips, beside functional ops, a gate and an int path
    through a pass-through leaf (Flatten)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.0)
        self.norm = nn.LayerNorm(16)
        self.gate = nn.Linear(16, 16)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.soft = nn.Softmax(dim=-1)
        self.flat = nn.Flatten(0)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.drop(F.gelu(self.fc(self.emb(self.flat(ids)).mean(0, keepdim=True)))))
        h = h * torch.sigmoid(self.gate(h))
        c = self.conv(h.unsqueeze(1)).mean(1)
        return self.head(self.soft(self.act(c + h)) * 2.0)


def _flow(model: nn.Module, ids: torch.Tensor) -> tuple:
    probe = trainlint.probe.Probe(model).attach()
    probe.begin_step()
    model(ids).sum().backward()
    snap = probe.collect()
    probe.detach()
    return snap.edges, snap.output_origins, set(snap.points)


def test_skipping_the_ops_inside_torch_nn_leaves_changes_no_data_flow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = FlowMix()
    ids = torch.randint(0, 10, (2, 3))
    skipped = _flow(model, ids)
    monkeypatch.setattr(trainlint.probe, "OPAQUE_LEAVES", frozenset())
    followed = _flow(model, ids)
    assert skipped == followed
    edges = skipped[0]
    assert any(dst == ("op", "mul") for _, dst, _ in edges)  # the gate is seen
    assert any(dst == ("module", "norm") for _, dst, _ in edges)


def test_a_parameters_norm_is_nan_when_its_sample_holds_nan_and_zero_when_it_is_empty() -> None:
    """Stepped or not: a weight whose values hold a NaN has a NaN norm (not the norm of its
    finite values), an empty parameter the norm 0, the others their exact norm."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model.register_parameter("empty", nn.Parameter(torch.zeros(0)))
    with torch.no_grad():
        model[0].weight[1, 2] = math.nan
    opt = torch.optim.SGD(list(model[0].parameters()) + [model.empty], lr=0.0)  # [1]: no step
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        loss = model(torch.randn(5, 4)).sum()
        loss.backward()
        opt.step()
        monitor.step(loss)
        params = {p.name: p for p in monitor.report().trace.params}
    assert math.isnan(params["0.weight"].norm)
    assert params["empty"].norm == 0.0
    for name in ("0.bias", "1.weight", "1.bias"):
        want = dict(model.named_parameters())[name].detach().double().norm().item()
        assert params[name].norm == pytest.approx(want, rel=1e-9)


def test_an_integer_parameter_is_measured_not_a_crash() -> None:
    model = nn.Linear(4, 2)
    model.register_parameter("k", nn.Parameter(torch.arange(5), requires_grad=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(2):
            opt.zero_grad()
            loss = model(torch.randn(3, 4)).sum()
            loss.backward()
            opt.step()
            monitor.step(loss)
        [k] = [p for p in monitor.report().trace.params if p.name == "k"]
    assert k.norm == pytest.approx(math.sqrt(30.0))
    assert k.update_norms == [0.0, 0.0] and not k.nonfinite


class _SparseBag(nn.Module):
    def __init__(self, rows: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, 32, sparse=True)
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


@pytest.mark.parametrize("rows", [100, 5000])  # values copied whole / sampled
def test_a_sparse_gradient_is_measured_by_its_summed_values(rows: int) -> None:
    """A sparse embedding's gradient holds one entry per lookup (repeated ids repeat); its norm
    is that of the dense gradient, not of the entries."""
    torch.manual_seed(3)
    model = _SparseBag(rows)
    ids = torch.randint(0, 20, (64, 6))  # ids repeat: an uncoalesced gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        opt.zero_grad()
        loss = F.cross_entropy(model(ids), torch.randint(0, 3, (64,)))
        loss.backward()
        grad = model.emb.weight.grad
        assert grad.is_sparse and not grad.is_coalesced()
        truth = grad.to_dense().double().norm().item()
        entries = grad._values().double().norm().item()
        assert abs(entries - truth) > 1e-3 * truth  # the distinction this test is about
        opt.step()
        monitor.step(loss)
        [emb] = [p for p in monitor.report().trace.params if p.name == "emb.weight"]
    assert emb.grad_norm == pytest.approx(truth, rel=1e-5)
    assert not emb.grad_nonfinite


def test_a_sparse_gradient_with_nan_is_flagged_and_check_runs_on_sparse_models() -> None:
    model = _SparseBag(100)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")  # reaches the embedding's gradient
    report = trainlint.check(model, (torch.randint(0, 100, (8, 4)), torch.randint(0, 3, (8,))),
                             steps=1)
    params = {p.name: p for p in report.trace.params}
    assert params["emb.weight"].grad_nonfinite
    assert any(f.code == "TL504" for f in report.findings)


class _Routed(nn.Module):
    """Two ReLU experts; the batch rows go to expert 0 only (expert 1 sees an empty batch),
    unless ``dead``: then expert 0's bias is so negative that its ReLU never fires."""

    def __init__(self, dead: bool) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2)])
        self.head = nn.Linear(8, 3)
        if dead:
            with torch.no_grad():
                self.experts[0][0].bias.fill_(-100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts[0](x) + self.experts[1](x[:0]).sum(0))


@pytest.mark.parametrize("dead", [False, True])
def test_units_of_an_empty_call_are_not_dead_units(dead: bool) -> None:
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    report = trainlint.check(_Routed(dead), batch)
    flagged = {f.module for f in report.findings if f.code == "TL101"}
    layers = {lt.module: lt for lt in report.trace.layers}
    assert layers["experts.1.1"].unit_ever_active is None  # no sample: no record at all
    assert flagged == ({"experts.0.1"} if dead else set())


class Reordered(nn.Module):
    """The channels of a ReLU's input moved by a transpose: Conv1d (N, C, L) -> (N, L, C), or
    Linear (N, L, C) -> (N, C, L); 48 of the 64 channels get a bias of -8 (dead)."""

    def __init__(self, conv_first: bool) -> None:
        super().__init__()
        self.conv_first = conv_first
        self.conv = nn.Conv1d(8 if conv_first else 64, 64, 3, padding=1)
        self.fc = nn.Linear(64 if conv_first else 8, 64)
        self.act = nn.ReLU()
        self.head = nn.Linear(64, 3)
        with torch.no_grad():
            (self.conv if conv_first else self.fc).bias[16:] = -8.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_first:  # x: (N, 8, L)
            h = self.fc(self.act(self.conv(x).transpose(1, 2)))
        else:  # x: (N, L, 8)
            h = self.conv(self.act(self.fc(x).permute(0, 2, 1)).contiguous()).transpose(1, 2)
        return self.head(h.mean(1))


@pytest.mark.parametrize("conv_first", [True, False])
def test_the_units_of_a_relu_follow_their_channels_through_a_transpose(conv_first) -> None:
    torch.manual_seed(0)
    model = Reordered(conv_first)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 40, generator=g) if conv_first else torch.randn(16, 40, 8, generator=g)
    report = trainlint.check(model, (x, torch.randint(0, 3, (16,), generator=g)), steps=2)
    act = report.trace.layer_by_key()[("act", "output")]
    assert act.unit_ever_active.size == 64  # the channels, not the 40 time steps
    assert (~act.unit_ever_active).sum() == 48
    dead = [f for f in report.findings if f.code == "TL101"]
    assert [f.module for f in dead] == ["act"]
    assert dead[0].evidence["dead_fraction"] == pytest.approx(0.75)


class ConvTokens(nn.Module):
    """A conv map turned into tokens, (N, C, H, W) -> (N, H*W, C), before a ReLU: the units
    are the 16 channels (12 of them dead), not the 36 positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Linear(16, 3)
        with torch.no_grad():
            self.conv.bias[4:] = -20.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x).permute(0, 2, 3, 1).flatten(1, 2)).mean(1))


def test_the_units_of_a_relu_follow_their_channels_through_a_flatten() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    report = trainlint.check(ConvTokens(), (x, y), steps=2)
    act = report.trace.layer_by_key()[("act", "output")]
    assert act.unit_ever_active.size == 16 and (~act.unit_ever_active).sum() == 12
    assert [f.module for f in report.findings if f.code == "TL101"] == ["act"]


def test_point_rows_split_one_index_per_table_as_a_pick_per_point_does() -> None:
    """The one-device path (one fancy index per table, a slice per point) gives each point
    the rows, and the signal sums, that a pick of its own rows gives (the several-device
    path), in the points' order: points with several calls, none, or gradients only."""
    from trainlint.probe import Point, _point_rows

    rng = np.random.default_rng(0)
    cpu = torch.device("cpu")
    tables = (rng.normal(size=(7, 5)), rng.normal(size=(6, 3)), rng.normal(size=(7, 2)), None)
    calls = {"a": ([3, 0], [5]), "b": ([], [1, 2]), "c": ([6], []), "d": ([], []),
             "e": ([1, 2, 4], [0, 4, 3])}
    points = {}
    for name, (acts, grads) in calls.items():
        point = Point(key=(name,), module=name, type="T", op="output", kind=None, depth=0)
        point.act_rows[:] = [(cpu, i) for i in acts]
        point.grad_rows[:] = [(cpu, i) for i in grads]
        points[(name,)] = point
    one = _point_rows({cpu: tables}, points)
    several = _point_rows({cpu: tables, "elsewhere": tables}, points)
    assert [entry[0] for entry in one] == [entry[0] for entry in several] == list(points)
    for (_, *mine), (_, *theirs), (acts, grads) in zip(one, several, calls.values()):
        for got, want in zip(mine, theirs):
            assert (got is None) == (want is None)
            if want is not None:  # the signal's sums may differ in their last bit
                np.testing.assert_allclose(got, want, rtol=1e-12)
        if acts:
            np.testing.assert_array_equal(mine[0], tables[0][acts])
            np.testing.assert_allclose(mine[2], tables[2][acts].sum(axis=0))
        if grads:
            np.testing.assert_array_equal(mine[1], tables[1][grads])


class TokenMixer(nn.Module):
    """A hand-written attention whose name says nothing of it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v))


class Mixing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix, self.head = TokenMixer(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(x)
        return self.head(F.scaled_dot_product_attention(h, h, h).mean(1))


def test_modules_calling_scaled_dot_product_attention_are_attention_layers() -> None:
    from rules._graph import inside_attention, inside_attention_sublayer

    torch.manual_seed(0)
    report = trainlint.check(Mixing(), (torch.randn(4, 5, 8), torch.randint(0, 2, (4,))),
                             steps=1)
    modules = report.trace.modules
    assert {n for n, f in modules.items() if f.attrs.get("attends")} == {"", "mix"}
    assert inside_attention(report.trace, "mix.qkv")
    assert inside_attention_sublayer(report.trace, "mix.qkv")
    # The model's own forward called it too, which makes no layer of it an attention layer's.
    assert not inside_attention(report.trace, "head")
    assert not inside_attention_sublayer(report.trace, "head")


class LN(nn.Module):
    """nanoGPT's LayerNorm with an optional bias, under another name."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class PreNormMLP(nn.Module):
    """x + fc2(gelu(fc(ln(x)))) with GPT-2's init (std 0.02); ``inline``: the block calls
    F.layer_norm itself (a container is no norm layer)."""

    def __init__(self, inline: bool = False) -> None:
        super().__init__()
        self.inline = inline
        self.ln, self.fc, self.fc2 = LN(64), nn.Linear(64, 256), nn.Linear(256, 64)
        for layer in (self.fc, self.fc2):
            nn.init.normal_(layer.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, (64,)) if self.inline else self.ln(x)
        return x + self.fc2(F.gelu(self.fc(h)))


def test_a_leaf_whose_forward_is_f_layer_norm_is_a_layer_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), PreNormMLP(), PreNormMLP(), nn.Linear(64, 4))
    batch = torch.randn(32, 16), torch.randint(0, 4, (32,))
    report = trainlint.check(model, batch, steps=1)
    assert report.trace.modules["1.ln"].base == "LayerNorm"
    assert "TL301" not in {f.code for f in report.findings}  # normalized: 0.02 is fine
    inline = nn.Sequential(nn.Linear(16, 64), PreNormMLP(inline=True), nn.Linear(64, 4))
    modules = trainlint.check(inline, batch, steps=1).trace.modules
    assert modules["1"].base == "PreNormMLP"
