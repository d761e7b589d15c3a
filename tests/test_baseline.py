"""Baselines: keyed on (code, module); baselined findings are shown but do not fail the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from trainlint import baseline
from trainlint.engine import Finding, load_rules
from trainlint.errors import ConfigError
from trainlint.report import Report
from trainlint.trace import Location, RunTrace


def _finding(code: str, module: str, message: str = "measured 0.91", line: int = 3) -> Finding:
    r = load_rules()[code]
    return Finding(code=code, rule=r.name, severity=r.severity, module=module, message=message,
                   fix="fix", location=Location("model.py", line))


def _report(*findings: Finding) -> Report:
    return Report(findings=list(findings), trace=RunTrace(), target="model.py")


def test_round_trip_keeps_code_and_module(tmp_path: Path) -> None:
    report = _report(_finding("TL101", "net.3"), _finding("TL102", ""),
                     _finding("TL101", "net.3", "another hit on the same module"))
    path = tmp_path / "baseline.json"
    path.write_text(baseline.dumps(report), encoding="utf-8")
    assert baseline.load(path) == {("TL101", "net.3"), ("TL102", "")}
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["version"] == baseline.VERSION and doc["target"] == "model.py"
    assert [e["code"] for e in doc["findings"]] == ["TL101", "TL102"]  # sorted, deduplicated


def test_only_new_findings_fail() -> None:
    old = _report(_finding("TL101", "net.3"))
    keys = baseline.parse(json.loads(baseline.dumps(old)))
    # the numbers in the message moved and the module's line moved: still the same finding
    again = _finding("TL101", "net.3", "measured 0.97 now", line=40)
    new_module = _finding("TL101", "net.5")
    new_rule = _finding("TL102", "net.3")
    report = baseline.apply(_report(again, new_module, new_rule), keys)
    assert [report.is_baselined(f) for f in report.findings] == [True, False, False]
    assert report.failing("warning") == [new_module, new_rule]
    assert report.exit_code("warning") == 1
    report.findings = [again]
    assert report.exit_code("info") == 0 and report.findings == [again]


def test_no_baseline_means_nothing_is_baselined() -> None:
    report = _report(_finding("TL101", "net.3"))
    assert report.baseline is None and not report.is_baselined(report.findings[0])
    assert "baselined" not in report.to_dict()["summary"]


@pytest.mark.parametrize("text, match", [
    ("not json", "not valid JSON"),
    ('{"version": 99, "findings": []}', "not a trainlint baseline"),
    ('{"version": 1, "findings": [{"code": "TL101"}]}', "code, module"),
])
def test_bad_files_are_config_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "b.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        baseline.load(path)
    with pytest.raises(ConfigError, match="cannot read baseline"):
        baseline.load(tmp_path / "missing.json")


def test_cli_write_then_check_against_the_baseline(tmp_path: Path, schema_validator) -> None:
    path = tmp_path / "trainlint-baseline.json"
    first = run_cli(["check", "fixtures/dead_relu.py", "--write-baseline", path])
    assert first.exit_code == 0, first.stderr  # everything found is now the baseline
    assert ("TL101", "3") in baseline.load(path)

    run = run_cli(["check", "fixtures/dead_relu.py", "--baseline", path, "--format", "json"])
    assert run.exit_code == 0
    doc = run.doc
    schema_validator.validate(doc)
    assert doc["findings"] and all(f["baselined"] for f in doc["findings"])
    assert doc["summary"]["baselined"] == len(doc["findings"])
    text = run_cli(["check", "fixtures/dead_relu.py", "--baseline", path]).stdout
    assert "(baselined)" in text

    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["findings"] = [e for e in doc["findings"] if (e["code"], e["module"]) != ("TL101", "3")]
    path.write_text(json.dumps(doc), encoding="utf-8")
    run = run_cli(["check", "fixtures/dead_relu.py", "--baseline", path, "--format", "json"])
    assert run.exit_code == 1
    assert [(f["code"], f["module"]) for f in run.doc["findings"] if not f["baselined"]] == [
        ("TL101", "3")]


def test_cli_missing_baseline_exits_2(tmp_path: Path) -> None:
    run = run_cli(["check", "fixtures/dead_relu.py", "--baseline", tmp_path / "nope.json"])
    assert run.exit_code == 2 and "cannot read baseline" in run.stderr
