"""The measurements the catalog's rules read, against a direct computation: update ratios from
the real optimizer step, gradient presence, Monitor loss windows, 1-D inputs, train()
overrides."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


def _batch(n: int = 16, features: int = 8, classes: int = 4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def _direct_ratios(model: nn.Module, make_opt, batch, steps: int) -> dict:
    """‖w_after - w_before‖ / ‖w_before‖ per step, by hand on a copy."""
    model = copy.deepcopy(model)
    opt = make_opt(model.parameters())
    out: dict = {name: [] for name, _ in model.named_parameters()}
    x, y = batch
    for _ in range(steps):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for n, p in model.named_parameters():
            out[n].append(((p.detach() - before[n]).norm() / before[n].norm()).item())
    return out


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
])
def test_update_ratios_are_measured_against_the_weight_before_the_step(make_opt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batch = _batch()
    expected = _direct_ratios(model, make_opt, batch, steps=3)
    report = trainlint.check(model, batch, optimizer=make_opt, steps=3)
    for p in report.trace.params:
        assert p.update_ratios == pytest.approx(expected[p.name], rel=1e-6)
        assert p.grad_steps == 3


def test_update_ratio_of_a_large_weight_is_estimated_from_a_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 4))

    def make_opt(p):
        return torch.optim.SGD(p, lr=0.5)

    batch = _batch()
    expected = _direct_ratios(model, make_opt, batch, steps=2)
    report = trainlint.check(model, batch, optimizer=make_opt, steps=2)
    [big] = [p for p in report.trace.params if p.name == "2.weight"]
    assert big.update_ratios == pytest.approx(expected["2.weight"], rel=0.1)


def test_each_parameter_knows_its_param_group_and_its_learning_rate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))

    def make_opt(params):
        body, head = list(params)[:4], [model[4].weight]  # 4.bias left out of the optimizer
        return torch.optim.Adam([{"params": body, "lr": 1e-3}, {"params": head, "lr": 1.0}])

    report = trainlint.check(model, _batch(), optimizer=make_opt, steps=2)
    groups = {p.name: (p.group, p.lr) for p in report.trace.params}
    assert groups == {"0.weight": (0, 1e-3), "0.bias": (0, 1e-3), "2.weight": (0, 1e-3),
                      "2.bias": (0, 1e-3), "4.weight": (1, 1.0), "4.bias": (None, None)}
    [ratio] = [f for f in report.findings if f.code == "TL503"]
    assert ratio.evidence["group"] == 1 and ratio.evidence["params"] == ["4.weight"]
    default = trainlint.check(model, _batch(), steps=1).trace.params
    assert {(p.group, p.lr) for p in default} == {(0, 0.01)}


def test_a_parameter_that_never_gets_a_gradient_has_no_grad_steps():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 4)
            self.spare = nn.Linear(8, 4)

        def forward(self, x):
            return self.used(x)

    report = trainlint.check(Unused(), _batch(), steps=2)
    steps = {p.name: p.grad_steps for p in report.trace.params}
    assert steps == {"used.weight": 2, "used.bias": 2, "spare.weight": 0, "spare.bias": 0}
    assert [f.module for f in report.findings if f.code == "TL505"] == ["spare"]


def test_monitor_windows_average_every_step_between_observations():
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    every = 4
    losses = [float(v) for v in torch.linspace(3.0, 1.0, 12)]
    losses[6] = 9.0  # a spike inside a window: only the window's mean and max see it
    x, y = _batch()
    with trainlint.Monitor(model, opt, every=every) as monitor:
        for value in losses:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(torch.tensor(value))
        per_step = monitor.report().trace.per_step
    windows = [losses[0:1], losses[1:5], losses[5:9]]
    assert [s["step"] for s in per_step] == [0, 4, 8]
    for s, window in zip(per_step, windows):
        assert s["loss"] == pytest.approx(window[-1])
        assert s["loss_mean"] == pytest.approx(sum(window) / len(window))
        assert s["loss_max"] == pytest.approx(max(window))


def test_a_window_longer_than_a_fold_keeps_each_steps_own_loss():
    """A window of more steps than ``LOSS_FOLD`` (folded in parts), with a spike in its first
    part; the loss passed is a running tensor the loop changes in place afterwards, and one
    step passes a per-sample loss vector (its mean counts)."""
    from trainlint import monitor as monitor_module

    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    every = monitor_module.LOSS_FOLD + 40
    values = [1.0 + 0.001 * i for i in range(every + 1)]
    values[5] = 50.0
    running = torch.zeros(())
    x, y = _batch()
    with trainlint.Monitor(model, opt, every=every) as monitor:
        for i, value in enumerate(values):
            if i == 0 or i == every:
                F.cross_entropy(model(x), y).backward()
                opt.step()
            running.fill_(value)
            monitor.step(torch.tensor([value, -7.0]) if i == 7 else running)
            running.fill_(-1.0)  # what the loss tensor holds after step(): not read
        per_step = monitor.report().trace.per_step
    window = values[1:every + 1]
    window[6] = (values[7] - 7.0) / 2  # a per-sample loss vector counts by its mean
    assert [s["step"] for s in per_step] == [0, every]
    assert per_step[1]["loss"] == pytest.approx(values[-1])
    assert per_step[1]["loss_mean"] == pytest.approx(sum(window) / len(window))
    assert per_step[1]["loss_max"] == pytest.approx(50.0)


def test_a_nan_between_observations_reaches_the_trace():
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with trainlint.Monitor(model, opt, every=3) as monitor:
        x, y = _batch()
        for value in [2.0, 1.9, float("nan"), 1.8, 1.7]:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            monitor.step(value)
        report = monitor.report()
    assert report.trace.losses == pytest.approx([2.0, 1.8])
    assert math.isnan(report.trace.per_step[1]["loss_max"])
    assert [f.code for f in report.findings if f.code == "TL604"] == ["TL604"]


def test_a_one_dimensional_input_is_one_feature_over_the_batch():
    class Conditioned(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x, t):
            return self.fc(x) * t[:, None]

    x, y = _batch()
    t = torch.linspace(0.0, 500.0, 16)
    report = trainlint.check(Conditioned(), ((x, t), y), steps=1)
    [cond] = [i for i in report.trace.inputs if i.name == "input1"]
    assert cond.mean == pytest.approx([t.double().mean().item()])
    assert cond.std == pytest.approx([t.double().std(unbiased=False).item()])
    assert (cond.min[0], cond.max[0]) == (0.0, 500.0)


def test_modules_that_override_train_are_marked():
    class FrozenBackbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x)

        def train(self, mode: bool = True):
            return super().train(False)

    class LibraryWrapper(nn.Module):  # as DistributedDataParallel / PreTrainedModel
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

        def train(self, mode: bool = True):
            return super().train(mode)

    LibraryWrapper.train.__module__ = "transformers.modeling_utils"
    model = LibraryWrapper(nn.Sequential(FrozenBackbone()))
    report = trainlint.check(model, _batch(), steps=1)
    marked = {name: facts.attrs["overrides_train"] for name, facts in report.trace.modules.items()}
    assert marked == {"": False, "inner": False, "inner.0": True, "inner.0.fc": False}
