"""Hand-built traces for rule tests: just the fields a rule reads, nothing measured."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from trainlint.engine import RULES, Hit, Thresholds, load_rules
from trainlint.trace import (
    ActivationStats,
    Edge,
    InputTrace,
    LayerTrace,
    ModuleFacts,
    ParamTrace,
    RunTrace,
)

load_rules()


def defaults(code: str) -> dict:
    """The rule's default thresholds (tests never copy the numbers)."""
    return dict(RULES[code].defaults)


def hits(code: str, trace: RunTrace, **overrides: Any) -> list[Hit]:
    """Run one rule on a trace with its defaults (and ``overrides``)."""
    values = defaults(code)
    values.update(overrides)
    return list(RULES[code].func(trace, Thresholds(values)))


def act(rms: float = 1.0, mean: float = 0.0, saturated: float = 0.0, nonfinite: int = 0,
        count: int = 1024) -> ActivationStats:
    std = math.sqrt(max(rms * rms - mean * mean, 0.0))
    return ActivationStats(count=count, mean=mean, std=std, min=-3 * rms, max=3 * rms,
                           zero_fraction=0.0, nonfinite=nonfinite, saturated_fraction=saturated,
                           rms=rms)


def point(module: str, type_: str, *, op: str = "output", depth: int = 0,
          kind: Optional[str] = None, rms: float = 1.0, mean: float = 0.0,
          saturated: float = 0.0, grad_norm: Optional[float] = None, shape: tuple = (8, 4),
          units: Optional[int] = None, backward_order: Optional[int] = None,
          nonfinite: int = 0, grad_nonfinite: int = 0) -> LayerTrace:
    return LayerTrace(module=module, type=type_, op=op, depth=depth, kind=kind,
                      activation=act(rms, mean, saturated, nonfinite), grad_norm=grad_norm,
                      grad_nonfinite=grad_nonfinite, backward_order=backward_order,
                      shape=shape, node=("point", module, op, units))


def module(name: str, type_: str, *, training: bool = True, leaf: bool = True,
           **attrs: Any) -> ModuleFacts:
    return ModuleFacts(name=name, type=type_, training=training, is_leaf=leaf, attrs=attrs)


def param(name: str, shape: tuple, *, requires_grad: bool = True,
          in_optimizer: Optional[bool] = True, std: float = 0.1, grad_norm: Optional[float] = 1.0,
          ratios: tuple = (), norm_before: float = 1.0, grad_steps: int = 1,
          group: Optional[int] = None, lr: Optional[float] = None,
          dtype: str = "float32") -> ParamTrace:
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    return ParamTrace(name=name, module=owner, shape=shape, requires_grad=requires_grad,
                      in_optimizer=in_optimizer, norm=norm_before, std=std, grad_norm=grad_norm,
                      update_ratios=list(ratios), norms_before=[norm_before] * len(ratios),
                      update_norms=[r * norm_before for r in ratios], grad_steps=grad_steps,
                      group=group, lr=lr, dtype=dtype)


def inputs(name: str, shape: tuple, mean: list, std: list, *, channel_dim: int = -1,
           lo: Optional[list] = None, hi: Optional[list] = None) -> InputTrace:
    mean_a, std_a = np.asarray(mean, float), np.asarray(std, float)
    return InputTrace(name=name, shape=shape, dtype="float32",
                      channel_dim=channel_dim % len(shape), mean=mean_a, std=std_a,
                      min=np.asarray(lo, float) if lo is not None else mean_a - 3 * std_a,
                      max=np.asarray(hi, float) if hi is not None else mean_a + 3 * std_a)


def edge(src: tuple, dst: tuple, via: tuple = ()) -> Edge:
    return Edge(src=src, dst=dst, via=via)


def to_module(lt: LayerTrace, name: str, via: tuple = ()) -> Edge:
    """An edge from a point's output into module ``name``."""
    return edge(lt.node, ("module", name), via)


def chain(*layers: LayerTrace) -> list[Edge]:
    """Edges feeding each layer's output into the next one's module (a plain stack)."""
    return [to_module(a, b.module) for a, b in zip(layers, layers[1:])]


def trace(layers: list = (), modules: Optional[list] = None, **fields: Any) -> RunTrace:
    """A RunTrace; modules default to one leaf module per layer (type from the layer)."""
    facts = {"": module("", "Model", leaf=False)}
    for lt in layers:
        facts.setdefault(lt.module, module(lt.module, lt.type))
    for m in modules or []:
        facts[m.name] = m
    return RunTrace(layers=list(layers), modules=facts, **fields)


def steps(*losses: float, first: int = 0, every: int = 1, key: str = "loss") -> list[dict]:
    """per_step entries with one loss value each."""
    return [{"step": first + i * every, "layers": {}, key: loss} for i, loss in enumerate(losses)]
