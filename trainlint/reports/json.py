"""The JSON report (SPEC section 5)."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from .. import __version__
from ..report import Report, relative_path
from .layers import layer_rows


def report_dict(report: Report) -> dict:
    trace = report.trace
    findings = []
    for f in report.findings:
        item = f.to_dict()
        if item["location"]:
            item["location"]["path"] = relative_path(item["location"]["path"])
        if report.baseline is not None:
            item["baselined"] = report.is_baselined(f)
        findings.append(item)
    summary = {**report.summary, "suppressed": len(report.suppressed)}
    if report.baseline is not None:
        summary["baselined"] = sum(report.is_baselined(f) for f in report.findings)
    return {
        "version": 1,
        "tool": {"name": "trainlint", "version": __version__},
        "target": report.target,
        "run": {"steps": trace.steps, "observed_steps": trace.observed_steps,
                "batch_size": trace.batch_size, "device": trace.device, "mode": trace.mode,
                "notes": list(report.notes)},
        "summary": summary,
        "findings": findings,
        "layers": layer_rows(trace),
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so the document stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    return value


def render(report: Report, indent: Optional[int] = 2, **_options: object) -> str:
    return json.dumps(_clean(report_dict(report)), indent=indent, allow_nan=False) + "\n"
