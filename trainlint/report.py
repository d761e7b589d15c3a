"""The Report: findings plus the trace they came from, in the shape every format reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from .engine import SEVERITY_RANK, Finding, Selection, run_rules
from .trace import RunTrace

FAIL_LEVELS = ("error", "warning", "info", "never")


@dataclass
class Report:
    """What ``trainlint.check`` and ``Monitor.report`` return."""

    findings: list
    trace: RunTrace
    target: str = ""
    notes: list = field(default_factory=list)
    suppressed: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there is no warning and no error."""
        return not any(f.severity in ("error", "warning") for f in self.findings)

    @property
    def summary(self) -> dict:
        counts = {"error": 0, "warning": 0, "info": 0}
        for f in self.findings:
            counts[f.severity] += 1
        return counts

    def failing(self, fail_on: str = "warning") -> list[Finding]:
        """Findings at or above ``fail_on`` (``never``: none)."""
        if fail_on == "never":
            return []
        limit = SEVERITY_RANK[fail_on]
        return [f for f in self.findings if SEVERITY_RANK[f.severity] <= limit]

    def exit_code(self, fail_on: str = "warning") -> int:
        return 1 if self.failing(fail_on) else 0

    def to_dict(self) -> dict:
        from .reports.json import report_dict

        return report_dict(self)

    def to_json(self, indent: Optional[int] = 2) -> str:
        from .reports.json import render

        return render(self, indent=indent)

    def __str__(self) -> str:
        from .reports.text import render

        return render(self)


def relative_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        absolute = os.path.abspath(path)
        cwd = os.getcwd()
    except OSError:
        return path
    if absolute == cwd or absolute.startswith(cwd + os.sep):
        return os.path.relpath(absolute, cwd)
    return path


def build_report(trace: RunTrace, selection: Selection, *, target: str = "",
                 notes: Optional[list] = None) -> Report:
    """Run the selected rules over ``trace`` and wrap the result."""
    findings, skip_notes = run_rules(trace, selection)
    all_notes = list(dict.fromkeys(list(notes or []) + list(trace.notes) + skip_notes))
    trace.notes = all_notes
    return Report(findings=findings, trace=trace, target=relative_path(target) if target else "",
                  notes=all_notes)
