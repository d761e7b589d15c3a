"""Snapshot and restore everything of the user's that a check touches.

Restoring is in place: the same parameter, buffer, grad and optimizer-state tensor objects come
back with their saved values, so references the user holds stay valid and bit-identical.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn


@dataclass
class UserState:
    """Parameters, buffers, grads, flags, optimizer state and RNG states, as they were."""

    params: list = field(default_factory=list)
    buffers: list = field(default_factory=list)
    training: list = field(default_factory=list)
    optimizer_state: Optional[tuple] = None
    optimizer_groups: Optional[tuple] = None
    rng: dict = field(default_factory=dict)


def snapshot(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> UserState:
    """Copy what a training step changes, so that :func:`restore` can put it back bit for bit."""
    state = UserState()
    with torch.no_grad():
        for module in model.modules():
            for name, p in module._parameters.items():
                saved = None
                if p is not None:
                    grad = p.grad
                    saved = (p.detach().clone(), p.requires_grad, grad,
                             None if grad is None else grad.detach().clone())
                state.params.append((module, name, p, saved))
            for name, b in module._buffers.items():
                state.buffers.append((module, name, b, None if b is None else b.detach().clone()))
    state.training = [(m, m.training) for m in model.modules()]
    if optimizer is not None:
        state.optimizer_state = _save(optimizer.state)
        groups = [("dict", g, {k: ("value", v, None) if k == "params" else _save(v)
                               for k, v in g.items()}) for g in optimizer.param_groups]
        state.optimizer_groups = ("list", optimizer.param_groups, groups)
    state.rng = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.rng["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: UserState, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Put back everything :func:`snapshot` saved (``model`` is the one snapshotted)."""
    with torch.no_grad():
        for module, name, p, saved in state.params:
            module._parameters[name] = p
            if saved is None:
                continue
            data, requires_grad, grad, grad_data = saved
            p.copy_(data)
            p.requires_grad_(requires_grad)
            if grad is not None:
                grad.copy_(grad_data)
            p.grad = grad
        for module, name, b, data in state.buffers:
            module._buffers[name] = b
            if b is not None:
                b.copy_(data)
    for module, flag in state.training:
        module.training = flag
    if optimizer is not None and state.optimizer_state is not None:
        _load(state.optimizer_state)
        _load(state.optimizer_groups)
    torch.set_rng_state(state.rng["torch"])
    random.setstate(state.rng["python"])
    np.random.set_state(state.rng["numpy"])
    if "cuda" in state.rng:
        torch.cuda.set_rng_state_all(state.rng["cuda"])


def _save(value: Any) -> tuple:
    """A tree that remembers each container and tensor object and a copy of its contents."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value, value.detach().clone())
    if isinstance(value, dict):
        return ("dict", value, {k: _save(v) for k, v in value.items()})
    if isinstance(value, list):
        return ("list", value, [_save(v) for v in value])
    return ("value", value, None)


def _load(saved: tuple) -> Any:
    """Put the saved contents back into the very objects :func:`_save` saw; return the object."""
    kind, obj, inner = saved
    if kind == "tensor":
        with torch.no_grad():
            obj.copy_(inner)
    elif kind == "dict":
        restored = {k: _load(v) for k, v in inner.items()}
        obj.clear()
        obj.update(restored)
    elif kind == "list":
        obj[:] = [_load(v) for v in inner]
    return obj
