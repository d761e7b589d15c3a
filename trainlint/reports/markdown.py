"""Markdown for a PR comment or a CI job summary: findings table, fixes, per-layer profile."""

from __future__ import annotations

from html import escape

from ..report import Report
from ._common import num, pct, summary_line, verdict, where_text
from .layers import layer_rows

ICONS = {"error": "🔴", "warning": "🟠", "info": "🔵"}


def cell(text: object) -> str:
    """Prose safe inside a table cell: no raw HTML, pipes escaped, newlines as <br>."""
    text = escape(str(text), quote=False).replace("\\", "\\\\")
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def code(text: str) -> str:
    """A table cell holding inline code (which survives backticks in ``text``); a line break
    (a module name can hold one) shows as ``\\n``, keeping the row on one line."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return (f"`` {text} ``" if "`" in text else f"`{text}`").replace("|", "\\|")


def _findings(report: Report) -> list[str]:
    if not report.findings:
        return ["No findings."]
    lines = ["| severity | code | rule | module | location | message | fix |",
             "|---|---|---|---|---|---|---|"]
    for f in report.findings:
        severity = f"{ICONS[f.severity]} {f.severity}"
        if report.is_baselined(f):
            severity += " (baselined)"
        location = where_text(report, f)
        lines.append("| " + " | ".join([
            severity, f.code, f.rule, code(f.module or "(model)"),
            code(location) if location else "-", cell(f.message), cell(f.fix)]) + " |")
    return lines


def _suppressed(report: Report) -> list[str]:
    if not report.suppressed:
        return []
    lines = ["", f"<details><summary>{len(report.suppressed)} suppressed finding(s)</summary>",
             "", "| code | rule | module | suppressed by | message |", "|---|---|---|---|---|"]
    for s in report.suppressed:
        f = s.finding
        lines.append(f"| {f.code} | {f.rule} | {code(f.module or '(model)')} | "
                     f"{cell(s.reason)} | {cell(f.message)} |")
    return lines + ["", "</details>"]


def _layers(report: Report) -> list[str]:
    rows = layer_rows(report.trace)
    if not rows:
        return []
    lines = ["", f"<details><summary>Per-layer profile ({len(rows)} observation points)"
             "</summary>", "",
             "| layer | type | act mean | act std | min | max | dead | saturated | grad norm |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        act = r["activation"] or {}
        grad = r["gradient"] or {}
        lines.append("| " + " | ".join([
            code(r["label"]), cell(r["type"]), num(act.get("mean")), num(act.get("std")),
            num(act.get("min")), num(act.get("max")), pct(act.get("dead_fraction")),
            pct(act.get("saturated_fraction")), num(grad.get("norm"))]) + " |")
    return lines + ["", "</details>"]


def render(report: Report, fail_on: str = "warning", **_options: object) -> str:
    trace = report.trace
    target = report.target or trace.model_type or "model"
    lines = [f"### trainlint: {cell(target)}", "",
             f"**{summary_line(report)}** — {verdict(report, fail_on)} "
             f"({trace.observed_steps} observed step(s), device {trace.device})", ""]
    lines += _findings(report)
    lines += _suppressed(report)
    lines += _layers(report)
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {cell(n)}" for n in report.notes]
    return "\n".join(lines) + "\n"
