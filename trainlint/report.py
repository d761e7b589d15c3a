"""The Report: findings plus the trace they came from, in the shape every format reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .baseline import finding_key
from .engine import SEVERITY_RANK, Finding, Selection, run_rules, skip_note
from .trace import RunTrace

FAIL_LEVELS = ("error", "warning", "info", "never")


@dataclass
class Report:
    """What ``trainlint.check`` and ``Monitor.report`` return."""

    findings: list
    trace: RunTrace
    target: str = ""
    notes: list = field(default_factory=list)
    # suppress.Suppressed entries: findings silenced by a comment or per-module-ignores
    suppressed: list = field(default_factory=list)
    # codes of the rules that ran, and {code: why} for those that could not (engine.Skip)
    checked: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    # (code, module) keys of a baseline (None: no baseline); baselined findings never fail
    baseline: Optional[frozenset] = None

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

    def is_baselined(self, finding: Finding) -> bool:
        """Whether ``finding`` was already in the baseline (so it does not fail the run)."""
        return self.baseline is not None and finding_key(finding) in self.baseline

    def failing(self, fail_on: str = "warning") -> list[Finding]:
        """Findings at or above ``fail_on`` (``never``: none), baselined ones excepted."""
        if fail_on == "never":
            return []
        limit = SEVERITY_RANK[fail_on]
        return [f for f in self.findings
                if SEVERITY_RANK[f.severity] <= limit and not self.is_baselined(f)]

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

    def plot(self, path: Optional[str] = None, **figure_options: Any) -> Any:
        """The report's pictures as a matplotlib Figure (needs ``trainlint[plot]``); with
        ``path`` (.png, .svg, .pdf) the figure is also saved there."""
        from .reports.plot import figure, save

        fig = figure(self, **figure_options)
        if path is not None:
            save(fig, path)
        return fig


def relative_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute with
    no ``..`` in it."""
    try:
        absolute = os.path.abspath(path)
        cwd = os.getcwd()
    except OSError:
        return path
    if absolute == cwd or absolute.startswith(cwd + os.sep):
        return os.path.relpath(absolute, cwd)
    return absolute


def build_report(trace: RunTrace, selection: Selection, *, target: str = "",
                 notes: Optional[list] = None) -> Report:
    """Run the selected rules over ``trace``, apply suppressions and wrap the result."""
    from .suppress import apply_suppressions

    findings, skip_notes = run_rules(trace, selection)
    findings, suppressed, suppress_notes = apply_suppressions(findings,
                                                              selection.per_module_ignores)
    all_notes = list(dict.fromkeys(list(notes or []) + list(trace.notes) + skip_notes
                                   + suppress_notes))
    trace.notes = all_notes
    active = selection.active()
    prefixes = {r.code: skip_note(r, "") for r in active}
    skipped = {code: note[len(prefix):] for code, prefix in prefixes.items()
               for note in skip_notes if note.startswith(prefix)}
    return Report(findings=findings, trace=trace, target=relative_path(target) if target else "",
                  notes=all_notes, suppressed=suppressed, checked=[r.code for r in active],
                  skipped=skipped)
