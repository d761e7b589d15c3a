"""Copies of a watched model: copy.deepcopy and torch.save while a Monitor's hooks are on."""

from __future__ import annotations

import copy
import gc
import io

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint.probe import Probe


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _probes() -> int:
    gc.collect()
    return sum(isinstance(o, Probe) for o in gc.get_objects())


def _watched() -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, trainlint.Monitor(model, optimizer=opt, every=1)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
          monitor: trainlint.Monitor, between=None) -> None:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long))
    loss.backward()
    opt.step()
    if between is not None:
        between()
    monitor.step(loss)


def test_a_deep_copy_carries_no_copy_of_the_monitor_and_sheds_its_hooks() -> None:
    model, opt, monitor = _watched()
    x = torch.randn(16, 4)
    _step(model, opt, x, monitor)
    assert _hooks(model) > 0  # every=1: the hooks stay on between steps
    probes = _probes()
    ema = copy.deepcopy(model)
    assert _probes() == probes  # the probe (and the monitor's history) was not copied
    ema(torch.randn(3, 4))  # the copy's forward: not observed; its inert hooks come off
    assert _hooks(ema) == 0
    assert not any(m._forward_hooks_always_called or m._forward_pre_hooks_with_kwargs
                   for m in ema.modules())
    _step(model, opt, x, monitor)
    layer = next(lt for lt in monitor.report().trace.layers if lt.module == "0")
    assert layer.activation.count == 2 * 16 * 8  # two steps of the watched model only
    monitor.close()
    assert _hooks(model) == 0


def test_torch_save_of_a_watched_model_holds_no_monitor() -> None:
    model, opt, monitor = _watched()
    x = torch.randn(16, 4)
    saved = io.BytesIO()
    _step(model, opt, x, monitor, between=lambda: torch.save(model, saved))  # mid-step
    watched_size = saved.tell()
    monitor.close()
    clean = io.BytesIO()
    torch.save(model, clean)
    assert watched_size < clean.tell() + 2048  # a few inert hooks, not the probe's buffers
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    out = loaded(torch.randn(3, 4))
    assert out.shape == (3, 2) and _hooks(loaded) == 0


def test_a_monitor_dropped_without_close_takes_its_hooks_off_when_collected() -> None:
    """Its hooks hold the probe, not the Monitor: once nothing refers to the Monitor (a
    notebook cell run again), it is collected, and its hooks go with it."""
    model, opt, monitor = _watched()
    _step(model, opt, torch.randn(16, 4), monitor)
    assert _hooks(model) > 0 and len(opt._optimizer_step_pre_hooks) > 0
    del monitor
    gc.collect()
    assert _hooks(model) == 0
    assert len(opt._optimizer_step_pre_hooks) == len(opt._optimizer_step_post_hooks) == 0
    loss = F.cross_entropy(model(torch.randn(16, 4)), torch.zeros(16, dtype=torch.long))
    loss.backward()
    opt.step()  # trains as it would without a Monitor
