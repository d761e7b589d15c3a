"""Small presentation helpers shared by the CI formats (no statistics here)."""

from __future__ import annotations

import math
from typing import Optional

from ..engine import Finding
from ..report import Report, relative_path

LEVEL_WORDS = {"error": "error(s)", "warning": "warning(s)", "info": "info"}


def num(value: Optional[float]) -> str:
    """A measured number for a table cell: 3 significant digits, scientific when tiny/huge."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def pct(value: Optional[float]) -> str:
    """A fraction as a whole percentage ("-" when absent)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{100 * value:.0f}%"


def where(report: Report, f: Finding) -> tuple[Optional[str], Optional[int]]:
    """(path, line) of a finding: the module's construction line, else the target file."""
    if f.location is not None:
        return relative_path(f.location.path), f.location.line
    if report.target:
        return report.target, None
    return None, None


def where_text(report: Report, f: Finding) -> str:
    """``path:line`` (or the path alone, or "")."""
    path, line = where(report, f)
    if path is None:
        return ""
    return f"{path}:{line}" if line is not None else path


def summary_line(report: Report) -> str:
    """"1 error(s), 2 warning(s), 0 info, 1 suppressed, 1 baselined"."""
    counts = report.summary
    parts = [f"{counts[level]} {word}" for level, word in LEVEL_WORDS.items()]
    parts.append(f"{len(report.suppressed)} suppressed")
    if report.baseline is not None:
        parts.append(f"{sum(report.is_baselined(f) for f in report.findings)} baselined")
    return ", ".join(parts)


def verdict(report: Report, fail_on: str = "warning") -> str:
    """Whether the run fails at ``fail_on``, in words."""
    failing = len(report.failing(fail_on))
    if fail_on == "never":
        return "passed (--fail-on never)"
    if failing:
        return f"failed: {failing} finding(s) at or above {fail_on}"
    return f"passed: no new finding at or above {fail_on}"
