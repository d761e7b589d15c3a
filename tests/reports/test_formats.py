"""Every format: registered, a pure function of the report, same exit status from the CLI."""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_cli
from trainlint.report import Report
from trainlint.reports import FORMATS, renderer
from trainlint.trace import RunTrace

CI_FORMATS = ["sarif", "junit", "github", "markdown", "html"]


def test_every_cli_format_is_registered() -> None:
    from trainlint.cli import FORMAT_CHOICES

    assert set(CI_FORMATS) <= set(FORMATS) == set(FORMAT_CHOICES)
    for name in FORMATS:
        params = inspect.signature(renderer(name)).parameters
        assert "fail_on" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize("fmt", CI_FORMATS)
def test_render_is_pure(hand_report: Report, fmt: str) -> None:
    before = copy.deepcopy(hand_report)
    first = renderer(fmt)(hand_report, fail_on="warning")
    assert renderer(fmt)(hand_report, fail_on="warning") == first
    assert hand_report.to_dict() == before.to_dict()
    assert [s.finding for s in hand_report.suppressed] == [s.finding for s in before.suppressed]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_exit_status_does_not_depend_on_the_format(fmt: str, tmp_path: Path) -> None:
    out = tmp_path / f"report.{fmt}"
    run = run_cli(["check", "fixtures/dead_relu.py", "--format", fmt, "--output", out])
    assert run.exit_code == 1, run.stderr
    assert out.stat().st_size > 0 and run.stdout == ""
    assert "TL101" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("fmt", ["junit", "sarif"])
def test_fail_on_error_passes_a_warning_in_every_format(fmt: str) -> None:
    run = run_cli(["check", "fixtures/dead_relu.py", "--format", fmt, "--fail-on", "error"])
    assert run.exit_code == 0, run.stderr


def test_pre_commit_hook_runs_the_cli() -> None:
    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    assert hook["id"] == "trainlint" and hook["entry"] == "trainlint check"
    # `trainlint check` takes one TARGET (given as args), not the list of changed files
    assert hook["pass_filenames"] is False


def test_readme_ci_recipes_use_real_formats_and_parse() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = readme[readme.index("## CI"):]
    used = re.findall(r"trainlint check \S+ --format (\w+)", ci)
    assert {"sarif", "junit", "github"} <= set(used) <= set(FORMATS)
    blocks = re.findall(r"```yaml\n(.*?)```", ci, re.S)
    assert len(blocks) >= 3 and all(yaml.safe_load(b) for b in blocks)
    shot = re.search(r"!\[[^\]]*\]\(([^)]+\.png)\)", ci).group(1)
    assert (ROOT / shot).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("fmt", CI_FORMATS)
def test_an_empty_run_renders(fmt: str) -> None:
    """A run that observed nothing (e.g. it stopped at the first forward) still reports."""
    report = Report(findings=[], trace=RunTrace(), target="", notes=["stopped early"])
    text = renderer(fmt)(report, fail_on="warning")
    assert text.strip()
    if fmt in ("markdown", "html", "sarif"):
        assert "stopped early" in text
    assert len(report.plot().get_axes()) == 1
