"""The report's pictures as plain data, drawn by ``_svg`` (HTML) and ``plot`` (matplotlib).

Every number comes from the trace (``layers.layer_rows``, ``trace.per_step``); this module
only arranges them: which layers, which axis, which colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..report import Report
from .layers import layer_rows

KIND_COLORS = {"relu": "#4c78a8", "gelu": "#4c78a8", "tanh": "#f58518", "sigmoid": "#f58518"}
OTHER_COLOR = "#9d9d9d"
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6",
           "#9d755d")
STEP_LAYERS = 6  # layers drawn in the over-steps panel, evenly spread along depth
VIEW_STDS = 4.0  # the distribution panel shows mean +- this many std (whiskers are clipped)


@dataclass
class Box:
    """One layer's distribution: whiskers min..max, box mean +- std, line at the mean."""

    x: float
    low: float
    q1: float
    mid: float
    q3: float
    high: float
    color: str
    label: str = ""


@dataclass
class Series:
    name: str
    ys: list  # one value (or None: nothing drawn) per entry of Panel.xs
    style: str  # "line" or "bar"
    color: str


@dataclass
class Panel:
    key: str
    title: str
    ylabel: str
    xlabel: str
    xs: list
    xlabels: list = field(default_factory=list)  # category labels (empty: numeric x)
    log: bool = False
    ylim: Optional[tuple] = None
    boxes: list = field(default_factory=list)
    series: list = field(default_factory=list)
    caption: str = ""


def _finite(value: Optional[float]) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _positive(value: Optional[float]) -> Optional[float]:
    return float(value) if _finite(value) and value > 0 else None


def _distribution(rows: list[dict]) -> Optional[Panel]:
    boxes = []
    for i, r in enumerate(rows):
        act = r["activation"]
        if act is None or not all(_finite(act[k]) for k in ("mean", "std")):
            continue
        mean, std = act["mean"], act["std"]
        low = act["min"] if _finite(act["min"]) else mean - VIEW_STDS * std
        high = act["max"] if _finite(act["max"]) else mean + VIEW_STDS * std
        boxes.append(Box(x=i, low=low, q1=mean - std, mid=mean, q3=mean + std, high=high,
                         color=KIND_COLORS.get(r["kind"], OTHER_COLOR), label=r["label"]))
    if not boxes:
        return None
    lo = min(max(b.low, b.mid - VIEW_STDS * (b.mid - b.q1)) for b in boxes)
    hi = max(min(b.high, b.mid + VIEW_STDS * (b.q3 - b.mid)) for b in boxes)
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    pad = 0.04 * (hi - lo)
    return Panel(
        key="activations", title="Activation distribution along depth", ylabel="activation",
        xlabel="layer (forward order)", xs=list(range(len(rows))),
        xlabels=[r["label"] for r in rows], ylim=(lo - pad, hi + pad), boxes=boxes,
        caption="Box: mean ± 1 std; whiskers: min to max (clipped to the view). Blue: "
                "ReLU family, orange: tanh/sigmoid, grey: other outputs.")


def _activity(rows: list[dict]) -> Optional[Panel]:
    dead = [None if (r["activation"] or {}).get("dead_fraction") is None
            else 100.0 * r["activation"]["dead_fraction"] for r in rows]
    sat = [None if (r["activation"] or {}).get("saturated_fraction") is None
           else 100.0 * r["activation"]["saturated_fraction"] for r in rows]
    series = [Series(name, ys, "bar", color) for name, ys, color in
              (("dead units %", dead, KIND_COLORS["relu"]),
               ("saturated outputs %", sat, KIND_COLORS["tanh"])) if any(_finite(y) for y in ys)]
    if not series:
        return None
    return Panel(key="activity", title="Dead / saturated per layer", ylabel="%",
                 xlabel="layer (forward order)", xs=list(range(len(rows))),
                 xlabels=[r["label"] for r in rows], ylim=(0.0, 100.0), series=series,
                 caption="Dead: units that never fired over the observed steps (ReLU family). "
                         "Saturated: outputs in the flat tails (tanh/sigmoid).")


def _gradients(rows: list[dict]) -> Optional[Panel]:
    norms = [_positive((r["gradient"] or {}).get("norm")) for r in rows]
    if not any(norms):
        return None
    return Panel(key="gradients", title="Gradient norm per layer", ylabel="‖grad‖ (log)",
                 xlabel="layer (forward order)", xs=list(range(len(rows))),
                 xlabels=[r["label"] for r in rows], log=True,
                 series=[Series("gradient norm", norms, "line", PALETTE[0])],
                 caption="Norm of the gradient w.r.t. each layer's output; gaps: no gradient.")


def _loss(per_step: list[dict]) -> Optional[Panel]:
    points = [(s["step"], s.get("loss")) for s in per_step if _finite(s.get("loss"))]
    if len(points) < 2:
        return None
    xs = [p[0] for p in points]
    ys = [float(p[1]) for p in points]
    log = min(ys) > 0 and max(ys) / min(ys) > 100
    return Panel(key="loss", title="Loss over observed steps", ylabel="loss" + (" (log)" if log
                                                                                 else ""),
                 xlabel="training step", xs=xs, log=log,
                 series=[Series("loss", ys, "line", PALETTE[3])])


def _steps(report: Report) -> list[Panel]:
    per_step = report.trace.per_step
    if len(per_step) < 2:
        return []
    xs = [s["step"] for s in per_step]
    panels = []
    layers = [lt for lt in report.trace.ordered_layers() if lt.activation is not None]
    if layers:
        count = min(STEP_LAYERS, len(layers))
        picked = dict.fromkeys(round(i * (len(layers) - 1) / max(count - 1, 1))
                               for i in range(count))
        series = []
        for i, lt in enumerate(layers[j] for j in picked):
            key = tuple(lt.node[1:])
            ys = [_positive(s.get("layers", {}).get(key, {}).get("std")) for s in per_step]
            if any(ys):
                series.append(Series(lt.label, ys, "line", PALETTE[i % len(PALETTE)]))
        if series:
            panels.append(Panel(key="steps-activations", title="Activation std over steps",
                                ylabel="std (log)", xlabel="training step", xs=xs, log=True,
                                series=series,
                                caption="Layers spread evenly along depth, first to last."))
    grads = [_positive(s.get("grad_norm")) for s in per_step]
    if any(grads):
        panels.append(Panel(key="steps-gradients", title="Total gradient norm over steps",
                            ylabel="‖grad‖ (log)", xlabel="training step", xs=xs, log=True,
                            series=[Series("parameter gradient norm", grads, "line",
                                           PALETTE[2])]))
    return panels


def panels(report: Report) -> list[Panel]:
    """The pictures of ``report`` that have data, in reading order."""
    rows = layer_rows(report.trace)
    out = [p for p in (_distribution(rows), _activity(rows), _gradients(rows),
                       _loss(report.trace.per_step)) if p is not None]
    return out + _steps(report)
