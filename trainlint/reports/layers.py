"""Per-layer rows shared by the formats that show the depth profile."""

from __future__ import annotations

import math
from typing import Optional

from ..trace import RunTrace

SPARKS = "▁▂▃▄▅▆▇█"


def layer_rows(trace: RunTrace) -> list[dict]:
    """One plain dict per observation point, in forward order."""
    rows = []
    for lt in trace.ordered_layers():
        act = lt.activation
        # An output with no finite value has no moments (its finite part's would read 0).
        none_finite = act is not None and act.count > 0 and act.nonfinite >= act.count
        rows.append({
            "module": lt.module, "label": lt.label, "type": lt.type, "op": lt.op,
            "kind": lt.kind, "depth": lt.depth,
            "activation": None if act is None else {
                "mean": math.nan if none_finite else act.mean,
                "std": math.nan if none_finite else act.std,
                "rms": math.nan if none_finite else act.rms,
                "min": act.min, "max": act.max, "zero_fraction": act.zero_fraction,
                "count": act.count,
                "nonfinite": act.nonfinite, "sampled": act.sampled,
                "saturated_fraction": (act.saturated_fraction if lt.kind in ("tanh", "sigmoid")
                                       and not none_finite else None),
                "dead_fraction": None if none_finite else lt.dead_fraction,
            },
            # A gradient that held NaN/Inf has a NaN norm (its finite part's is no norm of it).
            "gradient": None if lt.grad_norm is None else (
                {"norm": math.nan, "rms": math.nan} if lt.grad_nonfinite else
                {"norm": lt.grad_norm, "rms": lt.grad_rms}),
        })
    return rows


def sparkline(values: list[Optional[float]], log: bool = True) -> str:
    """A unicode sparkline of positive values (log scale by default); gaps for missing ones."""
    points = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not points:
        return ""
    scale = [math.log10(v) if log else v for v in points]
    lo, hi = min(scale), max(scale)
    out = []
    for v in values:
        if v is None or not (v > 0 and math.isfinite(v)):
            out.append(" ")
            continue
        s = math.log10(v) if log else v
        index = 0 if hi == lo else int(round((s - lo) / (hi - lo) * (len(SPARKS) - 1)))
        out.append(SPARKS[index])
    return "".join(out)
