"""The optimizers a run is given: which of them torch can hook, what wrappers keep, and the
parameters and param groups they hold."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch


def needs_closure(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` must be given a closure (LBFGS: it re-evaluates the loss
    during its line search)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def optimizers_of(optimizer: Any) -> list:
    """The optimizers in ``optimizer`` (none: None, one, or a list or tuple of them), each as
    the one whose steps can be hooked (:func:`hookable`)."""
    return [h for o in _given(optimizer) for h in hookable(o)]


def _given(optimizer: Any) -> list:
    """The optimizers as passed: none (None), one, or a list or tuple of them."""
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]


def wrapper_notes(optimizer: Any) -> list[str]:
    """A report's notes on the optimizers given that were watched through those they keep."""
    notes = []
    for outer in _given(optimizer):
        watched = hookable(outer)
        if watched != [outer]:
            names = " and ".join(type(o).__name__ for o in watched)
            notes.append(f"the optimizer given ({type(outer).__name__}) skips "
                         "Optimizer.__init__, so torch runs no hooks on its step(): the "
                         f"{names} it keeps was watched instead (its updates, without the "
                         "wrapper's own changes to the weights)")
    return notes


def unhookable(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a torch Optimizer subclass whose ``__init__`` skipped
    ``Optimizer.__init__`` (timm's Lookahead): torch then runs no hooks on its ``step()``."""
    return isinstance(optimizer, torch.optim.Optimizer) and \
        not hasattr(optimizer, "_optimizer_step_pre_hooks")


def hookable(optimizer: Any, depth: int = 0) -> list:
    """``[optimizer]``, or, where it is :func:`unhookable`, the optimizers it keeps and steps
    (through wrappers of wrappers); ``[optimizer]`` where it keeps none (the caller's check
    says so)."""
    if not unhookable(optimizer) or depth > 4:
        return [optimizer]
    inner = wrapped_optimizers(optimizer, [])
    return [h for o in inner for h in hookable(o, depth + 1)] if inner else [optimizer]


# Attributes under which optimizer wrappers keep the optimizer they step (SAM's
# base_optimizer, Lookahead's optimizer or _base_optimizer).
WRAPPED_ATTRS = ("base_optimizer", "_base_optimizer", "optimizer", "_optimizer",
                 "inner_optimizer")


def wrapped_optimizers(optimizer: Any, watched: list) -> list:
    """The torch optimizers that ``optimizer`` keeps as attributes (a wrapper's inner one), not
    watched themselves."""
    found = []
    for attr in WRAPPED_ATTRS:
        inner = vars(optimizer).get(attr) if hasattr(optimizer, "__dict__") else None
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer and \
                all(inner is not o for o in watched) and all(inner is not f for f in found):
            found.append(inner)
    return found


def optimizer_params(optimizers: list) -> list:
    """The parameters the optimizers' param groups hold, in order."""
    return [p for optimizer in optimizers for group in optimizer.param_groups
            for p in group["params"]]


def optimizer_groups(optimizers: list) -> dict:
    """``{id(param): (index of its param group, the group's lr, its scheduler's
    ``initial_lr``, the optimizer's class name)}`` (numbers plain, else None); the groups of
    several optimizers are numbered on, in order."""
    groups = [(group, type(optimizer).__name__) for optimizer in optimizers
              for group in optimizer.param_groups]
    return {id(p): (i, number_or_none(group.get("lr")), number_or_none(group.get("initial_lr")),
                    kind)
            for i, (group, kind) in enumerate(groups) for p in group["params"]}


def number_or_none(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) else None
