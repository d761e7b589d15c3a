"""JUnit XML parsed back: one suite per target, failures at --fail-on, skipped rules."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from trainlint import baseline
from trainlint.report import Report
from trainlint.reports import junit

from .conftest import dead_relu


def _suite(report: Report, fail_on: str = "warning") -> tuple[ET.Element, ET.Element]:
    text = junit.render(report, fail_on=fail_on)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(text.encode("utf-8"))
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    return root, suite


def _cases(suite: ET.Element, child: str) -> list[ET.Element]:
    return [c for c in suite.findall("testcase") if c.find(child) is not None]


def test_real_run(real_report: Report) -> None:
    root, suite = _suite(real_report)
    assert suite.get("name") == "fixtures/dead_relu.py"
    f = dead_relu(real_report)
    failed = next(c for c in _cases(suite, "failure") if c.get("line") == str(f.location.line))
    assert failed.get("classname") == f"trainlint.{f.code}"
    assert f.module in failed.get("name") and f.rule in failed.get("name")
    assert failed.get("file") == "fixtures/dead_relu.py"
    assert failed.get("line") == str(f.location.line)
    failure = failed.find("failure")
    assert failure.get("message") == f.message
    assert f.message in failure.text and f.fix in failure.text
    # every other rule that ran is one passing testcase; those that could not are skipped
    passing = [c for c in suite.findall("testcase") if len(c) == 0]
    found = {f.code for f in real_report.findings}
    assert {c.get("classname") for c in passing} == {
        f"trainlint.{code}" for code in real_report.checked
        if code not in found and code not in real_report.skipped}
    assert {c.get("classname") for c in _cases(suite, "skipped")} == {
        f"trainlint.{code}" for code in real_report.skipped}
    assert root.get("tests") == suite.get("tests") == str(
        len(real_report.checked) - len(found) + len(real_report.findings))
    assert root.get("failures") == suite.get("failures") == str(
        len(real_report.failing("warning")))


@pytest.mark.parametrize("fail_on", ["error", "warning", "info", "never"])
def test_failures_follow_fail_on(hand_report: Report, fail_on: str) -> None:
    _, suite = _suite(hand_report, fail_on)
    failed = {c.find("failure").get("message") for c in _cases(suite, "failure")}
    assert failed == {f.message for f in hand_report.failing(fail_on)}
    assert suite.get("failures") == str(len(failed))
    # findings below the bar still show, in system-out
    shown = [c.find("system-out").text for c in _cases(suite, "system-out")]
    below = [f for f in hand_report.findings if f.message not in failed]
    assert len(shown) == len(below)
    # XML parsers normalize CR LF to LF in text
    assert all(any(f.message.replace("\r\n", "\n") in text for text in shown) for f in below)


def test_skipped_rules_and_suppressed_findings(hand_report: Report) -> None:
    _, suite = _suite(hand_report)
    skipped = _cases(suite, "skipped")
    assert suite.get("skipped") == str(len(skipped)) == "2"
    messages = {c.get("classname"): c.find("skipped").get("message") for c in skipped}
    assert messages["trainlint.TL401"] == hand_report.skipped["TL401"]
    s = hand_report.suppressed[0]
    assert s.reason in messages[f"trainlint.{s.finding.code}"]
    assert suite.get("tests") == str(len(suite.findall("testcase")))


def test_model_level_finding_names_the_target(hand_report: Report) -> None:
    _, suite = _suite(hand_report)
    case = next(c for c in suite.findall("testcase") if "(model)" in c.get("name"))
    assert case.get("file") == hand_report.target and case.get("line") is None


def test_text_survives_the_round_trip(hand_report: Report) -> None:
    first = hand_report.findings[0]
    first.message += " \x00\x1b control"
    _, suite = _suite(hand_report)
    failure = next(c for c in _cases(suite, "failure")
                   if c.get("classname") == f"trainlint.{first.code}").find("failure")
    assert "<b>&amp;</b>" in failure.get("message") and '"q"' in failure.text
    assert "\ufffd\ufffd control" in failure.get("message")


def test_baselined_findings_do_not_fail(hand_report: Report) -> None:
    baseline.apply(hand_report, frozenset((f.code, f.module) for f in hand_report.findings))
    _, suite = _suite(hand_report, "info")
    assert _cases(suite, "failure") == []
    assert all("(baselined)" in c.find("system-out").text for c in _cases(suite, "system-out"))
