"""Baselines: record today's findings so that only new ones fail the run.

A baseline is keyed on (rule code, module name): messages carry measured numbers that move
from run to run, and source lines move with edits, so neither is part of the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Union

from .errors import ConfigError

if TYPE_CHECKING:
    from .engine import Finding
    from .report import Report

VERSION = 1


def finding_key(f: Finding) -> tuple[str, str]:
    """What identifies a finding across runs: its code and its module."""
    return (f.code, f.module)


def baseline_document(report: Report) -> dict:
    """The baseline file's content for the findings of ``report`` (active ones only)."""
    entries = {finding_key(f): {"code": f.code, "rule": f.rule, "module": f.module,
                                "severity": f.severity, "message": f.message}
               for f in report.findings}
    return {"version": VERSION, "tool": "trainlint", "target": report.target,
            "findings": [entries[k] for k in sorted(entries)]}


def dumps(report: Report) -> str:
    """The baseline file's text for ``report``."""
    return json.dumps(baseline_document(report), indent=2, allow_nan=False) + "\n"


def parse(document: object, where: str = "baseline") -> frozenset:
    """The keys of a baseline document; ConfigError when it is not one."""
    if not isinstance(document, dict) or document.get("version") != VERSION:
        raise ConfigError(f"{where}: not a trainlint baseline (version {VERSION} expected); "
                          "write one with --write-baseline")
    entries = document.get("findings")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("code"), str)
            and isinstance(e.get("module"), str) for e in entries):
        raise ConfigError(f"{where}: 'findings' must be a list of {{code, module}} entries")
    return frozenset((e["code"], e["module"]) for e in entries)


def load(path: Union[str, Path]) -> frozenset:
    """Read a baseline file written by ``--write-baseline``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read baseline {path}: {exc.strerror or exc}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return parse(document, str(path))


def apply(report: Report, keys: frozenset) -> Report:
    """Mark the findings of ``report`` found in the baseline ``keys``; returns ``report``."""
    report.baseline = frozenset(keys)
    return report
