"""SARIF 2.1.0, as GitHub code scanning (upload-sarif) and other SARIF viewers read it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from .. import __version__
from ..engine import Finding, Rule, load_rules
from ..report import Report
from ._common import where
from .json import _clean

SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
LEVELS = {"error": "error", "warning": "warning", "info": "note"}
FINGERPRINT = "trainlint/v1"
SUPPRESSION_KINDS = {"inline": "inSource", "config": "external"}


def fingerprint(code: str, module: str, target: str) -> str:
    """Stable across reruns: the rule, the module and the target, nothing measured."""
    text = f"{code}\0{module}\0{target}"  # a file name not in UTF-8 holds lone surrogates
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _section(doc: str, title: str) -> str:
    """The text of one ``## title`` section of a rule's docstring, on one line."""
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", doc, re.M | re.S)
    return " ".join(match.group(1).split()) if match else ""


def _descriptor(r: Rule) -> dict:
    return {
        "id": r.code,
        "name": r.name,
        "shortDescription": {"text": r.summary},
        "fullDescription": {"text": _section(r.doc, "What it does") or r.summary},
        "help": {"text": r.doc or r.summary, "markdown": r.doc or r.summary},
        "defaultConfiguration": {"level": LEVELS[r.severity]},
        "properties": {"tags": ["pytorch", "training", r.concern]},
    }


def _uri(path: str) -> str:
    """Repo-relative POSIX path when ``path`` is relative, else a file:// URI; percent-encoded
    either way (a space or ``#`` in a folder name is not a URI's; a name's bytes that are not
    UTF-8 are percent-encoded as the bytes they are)."""
    p = Path(path)
    quoted = quote(os.fsencode(p.as_posix()), safe="/")
    return "file://" + quoted if p.is_absolute() else quoted


def _result(report: Report, f: Finding, index: int,
            suppression: Optional[tuple[str, str]] = None) -> dict:
    path, line = where(report, f)
    location: dict = {"logicalLocations": [{"fullyQualifiedName": f.module or "(model)",
                                            "kind": "module"}]}
    if path is not None:
        location["physicalLocation"] = {"artifactLocation": {"uri": _uri(path)},
                                        "region": {"startLine": line or 1}}
    result = {
        "ruleId": f.code,
        "ruleIndex": index,
        "level": LEVELS[f.severity],
        "message": {"text": f"{f.module or '(model)'}: {f.message}\nFix: {f.fix}"},
        "locations": [location],
        "partialFingerprints": {FINGERPRINT: fingerprint(f.code, f.module, report.target)},
        "properties": {"module": f.module, "rule": f.rule, "severity": f.severity,
                       "fix": f.fix, "evidence": f.evidence},
    }
    if report.baseline is not None:
        result["baselineState"] = "unchanged" if report.is_baselined(f) else "new"
    if suppression is not None:
        kind, reason = suppression
        result["suppressions"] = [{"kind": SUPPRESSION_KINDS[kind], "status": "accepted",
                                   "justification": reason}]
    return result


def sarif_dict(report: Report) -> dict:
    """The SARIF log of ``report``: every registered rule, every finding (suppressed ones
    carry a ``suppressions`` entry)."""
    rules = list(load_rules().values())
    index = {r.code: i for i, r in enumerate(rules)}
    results = [_result(report, f, index[f.code]) for f in report.findings]
    results += [_result(report, s.finding, index[s.finding.code], (s.kind, s.reason))
                for s in report.suppressed]
    return {
        "$schema": SCHEMA_URI,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "trainlint", "version": __version__,
                                "semanticVersion": __version__,
                                "rules": [_descriptor(r) for r in rules]}},
            "invocations": [{
                "executionSuccessful": True,
                "toolExecutionNotifications": [{"level": "note", "message": {"text": note}}
                                               for note in report.notes],
            }],
            "results": results,
            "properties": {"target": report.target, "summary": report.summary},
        }],
    }


def render(report: Report, indent: Optional[int] = 2, **_options: object) -> str:
    return json.dumps(_clean(sarif_dict(report)), indent=indent, allow_nan=False) + "\n"
