"""Snapshot and restore everything of the user's that a check touches."""

from __future__ import annotations

import copy
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
    optimizer_state: Optional[dict] = None
    rng: dict = field(default_factory=dict)


def snapshot(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> UserState:
    """Copy what a training step changes, so that :func:`restore` can put it back bit for bit."""
    state = UserState()
    with torch.no_grad():
        for p in _unique(model.parameters()):
            grad = p.grad.detach().clone() if p.grad is not None else None
            state.params.append((p, p.detach().clone(), p.requires_grad, grad))
        for b in _unique(model.buffers()):
            state.buffers.append((b, b.detach().clone()))
    state.training = [(m, m.training) for m in model.modules()]
    if optimizer is not None:
        state.optimizer_state = {
            "state": {p: _detach(s) for p, s in optimizer.state.items()},
            "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                       for g in optimizer.param_groups],
        }
    state.rng = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.rng["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: UserState, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Put back everything :func:`snapshot` saved."""
    with torch.no_grad():
        for p, data, requires_grad, grad in state.params:
            p.copy_(data)
            p.requires_grad_(requires_grad)
            p.grad = grad
        for b, data in state.buffers:
            b.copy_(data)
    for module, flag in state.training:
        module.training = flag
    if optimizer is not None and state.optimizer_state is not None:
        optimizer.state.clear()
        optimizer.state.update(state.optimizer_state["state"])
        for group, saved in zip(optimizer.param_groups, state.optimizer_state["groups"]):
            group.update(saved)
    torch.set_rng_state(state.rng["torch"])
    random.setstate(state.rng["python"])
    np.random.set_state(state.rng["numpy"])
    if "cuda" in state.rng:
        torch.cuda.set_rng_state_all(state.rng["cuda"])


def _unique(tensors: Any) -> list:
    seen: set = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value
