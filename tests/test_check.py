"""``trainlint.check`` leaves the model, optimizer and RNGs bit-identical and hook-free."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as module_globals
from torch.overrides import _get_current_function_mode_stack

import trainlint
from trainlint.engine import SEVERITY_RANK

MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks")
GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                     "_global_backward_hooks", "_global_backward_pre_hooks",
                     "_global_forward_hooks_always_called")


def _bits(t: torch.Tensor | None) -> bytes | None:
    if t is None:
        return None
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def _plain(value: object) -> object:
    """Optimizer state as comparable plain data (tensors as their bytes)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), _bits(value))
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def everything(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict:
    """Every piece of user state check may touch, as bytes and plain values."""
    state = {
        "params": [(n, id(p), _bits(p), p.requires_grad, _bits(p.grad), p._backward_hooks)
                   for n, p in model.named_parameters()],
        "buffers": [(n, id(b), _bits(b)) for n, b in model.named_buffers()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "hooks": [(n, d, list(getattr(m, d, {}) or {})) for n, m in model.named_modules()
                  for d in MODULE_HOOK_DICTS],
        "global_hooks": [(d, list(getattr(module_globals, d))) for d in GLOBAL_HOOK_DICTS],
        "modes": len(_get_current_function_mode_stack()),
        "torch_rng": _bits(torch.get_rng_state()),
        "python_rng": random.getstate(),
        "numpy_rng": _plain(list(np.random.get_state())),
        "grad_enabled": torch.is_grad_enabled(),
    }
    if opt is not None:
        state["optimizer"] = _plain(opt.state_dict())
        state["optimizer_params"] = [[id(p) for p in g["params"]] for g in opt.param_groups]
        state["optimizer_hooks"] = (list(opt._optimizer_step_pre_hooks),
                                    list(opt._optimizer_step_post_hooks))
    return state


def assert_same(after: dict, before: dict) -> None:
    assert after.keys() == before.keys()
    for key in before:
        assert after[key] == before[key], f"check changed {key}"


class Boom(nn.Module):
    """Raises on its ``fail_on``-th call (a bug in the user's third layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.fail_on = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("boom in layer 3")
        return torch.tanh(x)


class Net(nn.Module):
    def __init__(self, third: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.third = third or nn.Identity()
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = self.drop(self.third(h))
        return self.head(h.flatten(1))


def user_setup(third: nn.Module | None = None) -> tuple:
    """A model mid-training: grads present, Adam state, a frozen param, a submodule in eval,
    a user hook, seeded RNGs."""
    torch.manual_seed(0)
    model = Net(third)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    F.cross_entropy(model(x), y).backward()  # leave grads behind
    model.conv.bias.requires_grad_(False)
    model.drop.eval()
    model.user_hook = model.head.register_forward_hook(lambda *a: None)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    return model, opt, (x, y)


def test_check_leaves_everything_bit_identical_and_hook_free() -> None:
    model, opt, batch = user_setup()
    before = everything(model, opt)
    report = trainlint.check(model, batch, optimizer=opt, steps=3)
    assert report.trace.observed_steps == 3
    after = everything(model, opt)
    assert_same(after, before)
    assert after["modes"] == 0


def test_check_with_optimizer_factory_and_default_leaves_model_identical() -> None:
    model, _opt, batch = user_setup()
    before = everything(model)
    trainlint.check(model, batch, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5), steps=2)
    trainlint.check(model, batch, steps=2)
    assert_same(everything(model), before)


def test_steps_really_trained_the_model() -> None:
    """Guard for the tests above: the steps did change the parameters before the restore."""
    model, opt, batch = user_setup()
    seen = []
    model.head.register_forward_pre_hook(lambda m, a: seen.append(_bits(m.weight)))
    trainlint.check(model, batch, optimizer=opt, steps=3)
    assert len(seen) == 3 and len(set(seen)) == 3


@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
def test_check_called_with_gradients_off_still_trains(grad_off) -> None:
    """A check called from an evaluation function (under no_grad / inference_mode) runs its
    training steps with gradients on, says so, and leaves the grad mode as it was."""
    model, opt, batch = user_setup()
    before = everything(model, opt)
    with grad_off():
        report = trainlint.check(model, batch, optimizer=opt, steps=2)
        assert not torch.is_grad_enabled()
    assert report.trace.observed_steps == 2
    assert any("gradients off" in n for n in report.notes)
    assert_same(everything(model, opt), before)


@pytest.mark.parametrize("fail_on", [1, 2])
def test_user_forward_raising_in_layer_three_restores_state_and_hooks(fail_on: int) -> None:
    model, opt, batch = user_setup(Boom())
    model.third.fail_on = model.third.calls + fail_on
    before = everything(model, opt)
    with pytest.raises(trainlint.UserCodeError) as info:
        trainlint.check(model, batch, optimizer=opt, steps=3)
    assert "boom in layer 3" in str(info.value) and "'third'" in str(info.value)
    assert "test_check.py" in info.value.user_traceback
    after = everything(model, opt)
    assert_same(after, before)
    assert _get_current_function_mode_stack() == []


def test_loss_raising_restores_state() -> None:
    model, opt, batch = user_setup()
    before = everything(model, opt)

    def bad_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise KeyError("no such target")

    with pytest.raises(trainlint.UserCodeError):
        trainlint.check(model, batch, loss_fn=bad_loss, optimizer=opt)
    assert_same(everything(model, opt), before)


def test_batchnorm_single_value_is_reported_not_raised() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Sequential(nn.BatchNorm1d(16)), nn.ReLU(),
                          nn.Linear(16, 3))
    batch = (torch.randn(1, 10), torch.tensor([1]))
    before = everything(model)
    report = trainlint.check(model, batch)
    codes = [(f.code, f.module) for f in report.findings]
    assert ("TL404", "1.0") in codes
    assert report.findings[0].severity == "error" and not report.ok
    assert any(note.startswith("the check stopped at training step 1") for note in report.notes)
    # No backward ran: that no parameter got a gradient says nothing (TL505 stays out).
    assert "TL505" not in {f.code for f in report.findings}
    assert "before its first backward" in report.skipped["TL505"]
    # Nor did a loss: the notes say so, not Monitor advice or an unknown loss function.
    for code in ("TL302", "TL601", "TL604"):
        assert "the check stopped before its first loss" in report.skipped[code], code
        assert "monitor.step" not in report.skipped[code]
    assert_same(everything(model), before)


class DeadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 64)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(64, 64)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(64, 4)
        with torch.no_grad():
            self.fc2.bias.fill_(-10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


def test_report_api() -> None:
    torch.manual_seed(0)
    report = trainlint.check(DeadNet(), (torch.randn(32, 8), torch.randint(0, 4, (32,))))
    assert [f.code for f in report.findings if f.severity == "warning"] == ["TL101"]
    assert not report.ok and report.exit_code("warning") == 1 and report.exit_code("error") == 0
    ranks = [SEVERITY_RANK[f.severity] for f in report.findings]
    assert ranks == sorted(ranks)
    finding = report.findings[0]
    assert finding.module == "act2" and "Linear 'fc2'" in finding.fix
    doc = json.loads(report.to_json())
    assert doc["findings"][0]["module"] == "act2"
    text = str(report)
    assert "TL101" in text and "dead-relu" in text
    assert finding.location is not None and finding.location.path.endswith("test_check.py")
    with open(finding.location.path) as source:
        assert "self.act2 = nn.ReLU()" in source.read().splitlines()[finding.location.line - 1]
