"""GitHub Actions workflow commands: one annotation per finding, shown inline on the PR diff.

``::warning file=model.py,line=12,title=TL101 dead-relu::message`` — data escapes ``%``, CR
and LF; property values also escape ``:`` and ``,``. Baselined findings become notices.
The Markdown job summary ($GITHUB_STEP_SUMMARY) is written by the CLI, not here.
"""

from __future__ import annotations

from ..engine import Finding
from ..report import Report
from ._common import summary_line, verdict, where

COMMANDS = {"error": "error", "warning": "warning", "info": "notice"}


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(report: Report, f: Finding) -> str:
    """The workflow command for one finding."""
    baselined = report.is_baselined(f)
    command = "notice" if baselined else COMMANDS[f.severity]
    path, line = where(report, f)
    props = []
    if path is not None:
        props.append(f"file={escape_property(path)}")
    if line is not None:
        props.append(f"line={line}")
    title = f"{f.code} {f.rule}" + (" (baselined)" if baselined else "")
    props.append(f"title={escape_property(title)}")
    message = f"{f.module or '(model)'}: {f.message}\nfix: {f.fix}"
    return f"::{command} {','.join(props)}::{escape_data(message)}"


def render(report: Report, fail_on: str = "warning", **_options: object) -> str:
    lines = [annotation(report, f) for f in report.findings]
    target = report.target or report.trace.model_type or "model"
    lines.append(f"trainlint {target}: {summary_line(report)}; {verdict(report, fail_on)}")
    return "\n".join(lines) + "\n"
