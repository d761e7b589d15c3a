"""Where ``Monitor(log_to=...)`` sends per-layer summary scalars after each observed step.

A sink is a TensorBoard ``SummaryWriter`` (anything with ``add_scalar(tag, value, step)``),
a Lightning logger (``log_metrics(metrics, step)``), a callable ``fn(scalars, step)``
taking a ``{name: float}`` dict, or a list of these. The scalars are read from the step's
entry in ``RunTrace.per_step``: sinks format numbers, they never compute statistics.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from .errors import ConfigError

PREFIX = "trainlint"
# Per-layer values of a per_step entry forwarded to the sink, and their scalar names.
LAYER_SCALARS = {"mean": "act_mean", "std": "act_std", "zero_fraction": "zero_fraction",
                 "dead_fraction": "dead_fraction", "grad_norm": "grad_norm"}

Sink = Callable[[dict, int], None]


def layer_label(key: tuple) -> str:
    """A point key ``(module, op, units)`` as a name: the module, plus ``:op`` for a
    functional activation (as ``LayerTrace.label``)."""
    module, op = key[0] or "(model)", key[1]
    return module if op == "output" else f"{module}:{op}"


def step_scalars(step_info: dict) -> dict[str, float]:
    """The flat ``{name: value}`` scalars of one ``RunTrace.per_step`` entry (finite only)."""
    out: dict[str, float] = {}
    for key, values in step_info.get("layers", {}).items():
        label = layer_label(key)
        for field, name in LAYER_SCALARS.items():
            value = values.get(field)
            if value is not None and math.isfinite(value):
                out[f"{PREFIX}/{label}/{name}"] = float(value)
    for field in ("loss", "grad_norm"):
        value = step_info.get(field)
        if value is not None and math.isfinite(value):
            out[f"{PREFIX}/{field}"] = float(value)
    return out


def make_sink(target: Any) -> Optional[Sink]:
    """A function ``(scalars, step) -> None`` writing to ``target``; None for None."""
    if target is None:
        return None
    if isinstance(target, (list, tuple)):
        sinks = [s for s in (make_sink(t) for t in target) if s is not None]

        def fan_out(scalars: dict, step: int) -> None:
            for sink in sinks:
                sink(scalars, step)

        return fan_out
    if hasattr(target, "add_scalar"):
        return lambda scalars, step: _add_scalars(target, scalars, step)
    if hasattr(target, "log_metrics"):
        return lambda scalars, step: target.log_metrics(scalars, step=step)
    if callable(target):
        return target
    raise ConfigError(f"log_to must be a SummaryWriter, a logger with log_metrics, a callable "
                    f"(scalars, step) or a list of these; got {type(target).__name__}")


def _add_scalars(writer: Any, scalars: dict, step: int) -> None:
    for name, value in scalars.items():
        writer.add_scalar(name, value, step)
