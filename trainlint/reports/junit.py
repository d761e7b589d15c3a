"""JUnit XML for Jenkins, GitLab (artifacts:reports:junit) and GitHub test reporters.

One testsuite per target; one testcase per (rule, module) with a finding, and one per rule
that ran clean. A finding at or above ``fail_on`` (and not baselined) is a ``<failure>``; a
rule that could not run, or a suppressed finding, is ``<skipped>``; findings below
``fail_on`` pass with their message in ``<system-out>``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Optional

from ..engine import Finding, load_rules
from ..report import Report
from ._common import summary_line, where

SUITE = "trainlint"
# Characters XML 1.0 cannot carry, even escaped.
NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _body(report: Report, f: Finding) -> str:
    path, line = where(report, f)
    place = f" ({path}:{line})" if path and line else (f" ({path})" if path else "")
    return f"{f.severity} {f.code} {f.rule} in {f.module or '(model)'}{place}\n{f.message}\n" \
           f"fix: {f.fix}\n"


def _case(suite: ET.Element, report: Report, code: str, name: str,
          f: Optional[Finding] = None) -> ET.Element:
    case = ET.SubElement(suite, "testcase", classname=f"{SUITE}.{code}", name=name, time="0")
    if f is not None:
        path, line = where(report, f)
        if path:
            case.set("file", path)
        if line:
            case.set("line", str(line))
    return case


def junit_tree(report: Report, fail_on: str = "warning") -> ET.Element:
    """The ``<testsuites>`` element of ``report``."""
    rules = load_rules()
    failing = {id(f) for f in report.failing(fail_on)}
    root = ET.Element("testsuites", name=SUITE)
    suite = ET.SubElement(root, "testsuite", name=report.target or report.trace.model_type
                          or "model", time="0")
    properties = ET.SubElement(suite, "properties")
    for key, value in (("fail_on", fail_on), ("device", report.trace.device),
                       ("observed_steps", report.trace.observed_steps),
                       ("summary", summary_line(report))):
        ET.SubElement(properties, "property", name=key, value=str(value))
    by_code: dict[str, list] = {}
    for f in report.findings:
        by_code.setdefault(f.code, []).append(f)
    for code in report.checked:
        title = f"{code} {rules[code].name}" if code in rules else code
        if code in report.skipped:
            case = _case(suite, report, code, f"{title} (not checked)")
            ET.SubElement(case, "skipped", message=report.skipped[code])
            continue
        if code not in by_code:
            _case(suite, report, code, f"{title}: every module")
        for f in by_code.get(code, []):
            case = _case(suite, report, code, f"{title}: {f.module or '(model)'}", f)
            if id(f) in failing:
                failure = ET.SubElement(case, "failure", type=f"{f.code} {f.rule}",
                                        message=f.message)
                failure.text = _body(report, f)
            else:
                note = " (baselined)" if report.is_baselined(f) else ""
                ET.SubElement(case, "system-out").text = _body(report, f) + note
    for s in report.suppressed:
        f = s.finding
        case = _case(suite, report, f.code, f"{f.code} {f.rule}: {f.module or '(model)'}", f)
        ET.SubElement(case, "skipped", message=f"suppressed by {s.reason}").text = _body(report, f)
    _count(root, suite)
    return root


def _count(root: ET.Element, suite: ET.Element) -> None:
    cases = suite.findall("testcase")
    counts = {"tests": len(cases),
              "failures": sum(c.find("failure") is not None for c in cases),
              "errors": 0}
    for element in (root, suite):
        for key, value in counts.items():
            element.set(key, str(value))
    suite.set("skipped", str(sum(c.find("skipped") is not None for c in cases)))


def render(report: Report, fail_on: str = "warning", **_options: object) -> str:
    root = junit_tree(report, fail_on)
    ET.indent(root)
    text = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + NOT_XML.sub("\ufffd", text) + "\n"
