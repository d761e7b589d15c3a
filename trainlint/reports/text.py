"""The terminal report: findings with their fixes, then the per-layer profile (100 columns)."""

from __future__ import annotations

import math
import textwrap
from typing import Optional

from tabulate import tabulate

from ..report import Report, relative_path
from .layers import layer_rows, sparkline

WIDTH = 100


def _num(value: Optional[float], pct: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if pct:
        return f"{100 * value:.0f}%"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _header(report: Report) -> str:
    trace = report.trace
    bits = [f"{trace.observed_steps} observed step(s)"]
    if trace.batch_size:
        bits.append(f"batch {trace.batch_size}")
    bits.append(trace.device)
    target = report.target or trace.model_type or "model"
    return f"trainlint: {target} ({', '.join(bits)})"


def _findings(report: Report) -> str:
    if not report.findings:
        return (f"No findings ({len(report.suppressed)} suppressed)." if report.suppressed
                else "No findings.")
    lines = []
    for f in report.findings:
        where = relative_path(str(f.location)) if f.location else "-"
        head = f"{f.severity.upper():<7} {f.code} {f.rule}  {f.module or '(model)'}  {where}"
        if report.is_baselined(f):
            head += "  (baselined)"
        lines.append(head)
        lines += textwrap.wrap(f.message, WIDTH, initial_indent="    ", subsequent_indent="    ")
        lines += textwrap.wrap(f.fix, WIDTH, initial_indent="    fix: ",
                               subsequent_indent="         ")
    counts = report.summary
    lines.append("")
    lines.append(f"{counts['error']} error(s), {counts['warning']} warning(s), "
                 f"{counts['info']} info" + (f", {len(report.suppressed)} suppressed"
                                             if report.suppressed else ""))
    return "\n".join(lines)


def _layers(report: Report) -> str:
    rows = layer_rows(report.trace)
    if not rows:
        return ""
    table = []
    for r in rows:
        act = r["activation"] or {}
        grad = r["gradient"] or {}
        label = r["label"] if len(r["label"]) <= 34 else "…" + r["label"][-33:]
        table.append([label, r["type"][:18], _num(act.get("mean")), _num(act.get("std")),
                      _num(act.get("dead_fraction"), pct=True),
                      _num(act.get("saturated_fraction"), pct=True), _num(grad.get("norm"))])
    text = tabulate(table, headers=["layer", "type", "act mean", "act std", "dead", "sat",
                                    "grad norm"], tablefmt="simple", disable_numparse=True)
    stds = [(r["activation"] or {}).get("std") for r in rows]
    spark = sparkline(stds)
    profile = f"activation std along depth (log scale): {spark}" if spark else ""
    return text + ("\n\n" + profile if profile else "")


def render(report: Report, **_options: object) -> str:
    parts = [_header(report), "", _findings(report)]
    layers = _layers(report)
    if layers:
        parts += ["", layers]
    if report.notes:
        parts += ["", "notes:"]
        for note in report.notes:
            parts += textwrap.wrap(note, WIDTH, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(parts) + "\n"
