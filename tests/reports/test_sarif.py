"""SARIF 2.1.0: valid against the published schema, rules from the registry, stable results."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from urllib.parse import unquote

import jsonschema
import pytest

from trainlint import baseline
from trainlint.engine import load_rules
from trainlint.report import Report
from trainlint.reports import sarif

from .conftest import dead_relu

LEVEL = {"error": "error", "warning": "warning", "info": "note"}


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft4Validator:
    data = Path(__file__).resolve().parents[1] / "data"
    schema = json.loads((data / "sarif-schema-2.1.0.json").read_text(encoding="utf-8"))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _doc(report: Report) -> dict:
    return json.loads(sarif.render(report))


def test_real_run_is_valid_sarif(real_report: Report, validator) -> None:
    doc = _doc(real_report)
    validator.validate(doc)
    assert doc["version"] == "2.1.0"
    results = doc["runs"][0]["results"]
    assert len(results) == len(real_report.findings)
    f = dead_relu(real_report)
    result = results[real_report.findings.index(f)]
    assert result["ruleId"] == f.code and result["level"] == LEVEL[f.severity]
    physical = result["locations"][0]["physicalLocation"]
    assert physical["artifactLocation"]["uri"] == "fixtures/dead_relu.py"
    assert physical["region"]["startLine"] == f.location.line
    assert f.message in result["message"]["text"] and f.fix in result["message"]["text"]
    assert result["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] == f.module


def test_every_corner_case_is_valid(hand_report: Report, validator) -> None:
    validator.validate(_doc(hand_report))
    baseline.apply(hand_report, frozenset({(hand_report.findings[0].code, "enc.0")}))
    validator.validate(_doc(hand_report))


def test_driver_lists_every_registered_rule(hand_report: Report) -> None:
    driver = _doc(hand_report)["runs"][0]["tool"]["driver"]
    rules = load_rules()
    assert [d["id"] for d in driver["rules"]] == list(rules)
    for d in driver["rules"]:
        r = rules[d["id"]]
        assert d["name"] == r.name
        assert d["defaultConfiguration"]["level"] == LEVEL[r.severity]
        assert d["shortDescription"]["text"] == r.summary
        assert d["help"]["text"] == r.doc and d["help"]["markdown"] == r.doc
        assert d["fullDescription"]["text"]


def test_results_point_at_their_rules_and_places(hand_report: Report) -> None:
    run = _doc(hand_report)["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    results = run["results"]
    assert len(results) == len(hand_report.findings) + len(hand_report.suppressed)
    for result, f in zip(results, hand_report.findings):
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"] == f.code
        assert result["level"] == LEVEL[f.severity]
        assert "suppressions" not in result and "baselineState" not in result
    uris = [r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in results]
    lines = [r["locations"][0]["physicalLocation"]["region"]["startLine"] for r in results]
    # inside the working directory: relative; outside: an absolute file URI
    assert uris[0] == "fixtures/dead_relu.py" and lines[0] == 12
    assert uris[1] == "file:///nonexistent-root/elsewhere/model.py" and lines[1] == 7
    # a model-level finding without a location points at the target file
    assert uris[2] == hand_report.target and lines[2] == 1


def test_info_is_a_note_and_nan_evidence_stays_json(hand_report: Report) -> None:
    def reject(token: str) -> None:
        pytest.fail(f"{token} is not JSON")

    results = json.loads(sarif.render(hand_report), parse_constant=reject)["runs"][0]["results"]
    assert results[3]["level"] == "note"
    assert results[1]["properties"]["evidence"]["ratio"] == "nan"


def test_suppressed_findings_are_kept_with_a_suppression(hand_report: Report) -> None:
    result = _doc(hand_report)["runs"][0]["results"][-1]
    s = hand_report.suppressed[0]
    assert result["ruleId"] == s.finding.code
    assert result["suppressions"] == [{"kind": "inSource", "status": "accepted",
                                       "justification": s.reason}]


def test_baseline_state_marks_new_and_unchanged(hand_report: Report) -> None:
    known = hand_report.findings[1]
    baseline.apply(hand_report, frozenset({(known.code, known.module)}))
    states = [r["baselineState"] for r in _doc(hand_report)["runs"][0]["results"]]
    assert states[:4] == ["new", "unchanged", "new", "new"]


def test_fingerprints_ignore_numbers_and_lines_but_not_identity(hand_report: Report) -> None:
    def prints(report: Report) -> list:
        return [r["partialFingerprints"] for r in _doc(report)["runs"][0]["results"]]

    before = prints(hand_report)
    assert len({json.dumps(p) for p in before}) == len(before)
    for f in hand_report.findings:
        f.message = f.message.replace("75%", "81%") + " (measured again)"
        f.evidence = {"dead_fraction": 0.81}
        f.location = None
    assert prints(hand_report) == before
    hand_report.findings[0].module = "enc.9"
    after = prints(hand_report)
    assert after[0] != before[0] and after[1:] == before[1:]
    hand_report.target = "other/model.py"
    assert all(a != b for a, b in zip(prints(hand_report), before))


def test_notes_become_notifications(hand_report: Report) -> None:
    invocation = _doc(hand_report)["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is True
    texts = [n["message"]["text"] for n in invocation["toolExecutionNotifications"]]
    assert texts == hand_report.notes


def test_relative_uris_are_percent_encoded(hand_report: Report) -> None:
    odd = Path.cwd() / "a b#c%d" / "model.py"  # a space, a fragment mark and a percent sign
    first = hand_report.findings[0]
    hand_report.findings[0] = dataclasses.replace(
        first, location=dataclasses.replace(first.location, path=str(odd)))
    result = _doc(hand_report)["runs"][0]["results"][0]
    uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == "a%20b%23c%25d/model.py"
    assert unquote(uri) == "a b#c%d/model.py"
