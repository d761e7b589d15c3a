"""GitHub workflow commands: one escaped annotation per finding; the job summary via the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_cli
from trainlint import baseline
from trainlint.report import Report
from trainlint.reports import github

from .conftest import dead_relu

COMMAND = re.compile(r"^::(error|warning|notice) ([^:]*)::(.*)$")


def _unescape(text: str) -> str:
    for escaped, raw in (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","),
                         ("%25", "%")):
        text = text.replace(escaped, raw)
    return text


def _parse(line: str) -> tuple[str, dict, str]:
    match = COMMAND.match(line)
    assert match, line
    props = dict(p.split("=", 1) for p in match.group(2).split(","))
    return match.group(1), {k: _unescape(v) for k, v in props.items()}, _unescape(match.group(3))


def test_escaping_follows_the_workflow_command_rules() -> None:
    assert github.escape_data("50% a\r\nb: c, d") == "50%25 a%0D%0Ab: c, d"
    assert github.escape_property("50% a\r\nb: c, d") == "50%25 a%0D%0Ab%3A c%2C d"


def test_real_run_annotates_the_construction_line(real_report: Report) -> None:
    lines = github.render(real_report).splitlines()
    assert len(lines) == len(real_report.findings) + 1
    f = dead_relu(real_report)
    command, props, message = _parse(lines[real_report.findings.index(f)])
    assert command == "warning"
    assert props == {"file": "fixtures/dead_relu.py", "line": str(f.location.line),
                     "title": f"{f.code} {f.rule}"}
    assert f.message in message and f.fix in message


def test_every_finding_is_one_line_that_round_trips(hand_report: Report) -> None:
    lines = github.render(hand_report).splitlines()
    assert len(lines) == len(hand_report.findings) + 1
    for line, f in zip(lines, hand_report.findings):
        command, props, message = _parse(line)
        assert command == {"error": "error", "warning": "warning", "info": "notice"}[f.severity]
        assert props["title"] == f"{f.code} {f.rule}"
        assert f.message in message and f.fix in message
    # the model-level finding names the target file and no line
    _, props, _ = _parse(lines[2])
    assert props["file"] == hand_report.target and "line" not in props
    assert "suppressed" in lines[-1] and not lines[-1].startswith("::")


def test_baselined_findings_become_notices(hand_report: Report) -> None:
    known = hand_report.findings[0]
    baseline.apply(hand_report, frozenset({(known.code, known.module)}))
    command, props, _ = _parse(github.render(hand_report).splitlines()[0])
    assert command == "notice" and props["title"].endswith("(baselined)")


@pytest.mark.parametrize("summary_set", [True, False])
def test_cli_appends_the_markdown_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          summary_set: bool) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("previous step\n", encoding="utf-8")
    if summary_set:
        monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    else:
        monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    run = run_cli(["check", "fixtures/dead_relu.py", "--format", "github"])
    assert run.exit_code == 1
    assert "::warning file=fixtures/dead_relu.py" in run.stdout
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("previous step\n")
    if summary_set:
        assert "| severity | code |" in text and "TL101" in text
    else:
        assert text == "previous step\n"
