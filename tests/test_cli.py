"""``trainlint check`` / ``rules`` / ``rule`` through the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, ROOT, fixture_run, run_cli
from tests.fixture_cases import REFINED, case_for, fixture_names, from_docstring
from trainlint.engine import RULES, load_rules
from trainlint.errors import TrainlintError
from trainlint.reports.layers import SPARKS

load_rules()
WIDTH = 100


# ------------------------------------------------------------------ every fixture

@pytest.mark.parametrize("name", fixture_names())
def test_fixture_declares_what_it_is(name: str) -> None:
    case = case_for(name)
    assert case is not None, (f"fixtures/{name}.py: start its docstring with 'Fault (TLxxx): ' "
                              "or 'Healthy', or add it to tests/fixture_cases.REFINED")
    declared = from_docstring(FIXTURES / f"{name}.py")
    if name in REFINED and declared is not None:
        assert set(declared.expect) == set(case.expect)
    if case.twin_of is not None:
        assert case.healthy and not case_for(case.twin_of).healthy


@pytest.mark.parametrize("name", fixture_names())
def test_fixture_through_the_cli(name: str, schema_validator) -> None:
    case = case_for(name)
    assert case is not None
    run = fixture_run(name)
    assert run.exit_code in (0, 1), run.stderr
    doc = run.doc
    schema_validator.validate(doc)
    assert doc["target"] == f"fixtures/{name}.py"
    serious = [(f["code"], f["module"]) for f in doc["findings"]
               if f["severity"] in ("error", "warning")]
    assert run.exit_code == (1 if serious else 0)
    if case.healthy:
        assert serious == []
        return
    if case.monitor:
        return
    for code, modules in case.expect.items():
        named = {f["module"] for f in doc["findings"] if f["code"] == code}
        assert named, f"{code} did not fire on {name}"
        if modules is not None:
            assert named == set(modules)
        if RULES[code].severity != "info":
            assert run.exit_code == 1
    for finding in doc["findings"]:
        location = finding["location"]
        if finding["code"] in case.expect and location is not None:
            assert location["path"].startswith("fixtures/")
            assert (ROOT / location["path"]).is_file()


@pytest.mark.parametrize("name,module,source", [
    ("dead_relu", "3", "nn.ReLU()"),
    ("functional_dead_relu", "blocks.1", "Block(HIDDEN, HIDDEN, dead_bias)"),
    ("functional_tanh_saturated", "hidden", "TanhLayer("),
    ("batchnorm_small_batch", "4", "nn.BatchNorm2d(32)"),
    ("batchnorm_single_value", "1", "nn.BatchNorm1d(64)"),
])
def test_findings_point_at_the_line_that_built_the_module(name: str, module: str,
                                                          source: str) -> None:
    [finding] = [f for f in fixture_run(name).doc["findings"] if f["module"] == module]
    line = (ROOT / finding["location"]["path"]).read_text().splitlines()[
        finding["location"]["line"] - 1]
    assert source in line


def test_dead_relu_fix_names_the_feeding_layer() -> None:
    [finding] = [f for f in fixture_run("dead_relu").doc["findings"] if f["code"] == "TL101"]
    assert "Linear '2'" in finding["fix"] and finding["evidence"]["feeding_module"] == "2"
    assert finding["evidence"]["feeding_bias_rms"] == pytest.approx(5.0, rel=1e-3)


def test_batchnorm_single_value_is_reported_instead_of_crashing() -> None:
    run = fixture_run("batchnorm_single_value")
    assert run.exit_code == 1
    [finding] = [f for f in run.doc["findings"] if f["code"] == "TL404"]
    assert finding["severity"] == "error" and "Traceback" not in run.stderr


def test_python_dash_m_is_the_same_command(schema_validator) -> None:
    proc = subprocess.run([sys.executable, "-m", "trainlint", "check", "fixtures/dead_relu.py",
                           "--format", "json", "--select", "TL101"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    schema_validator.validate(doc)
    assert [f["code"] for f in doc["findings"]] == ["TL101"]


# ------------------------------------------------------------------ select / ignore

def codes(*args: str) -> tuple[int, list]:
    run = run_cli(["check", "fixtures/dead_relu.py", "--format", "json", *args])
    return run.exit_code, [f["code"] for f in run.doc["findings"]]


@pytest.mark.parametrize("select", ["TL101", "dead-relu", "TL1", "tl10", "TL401,dead-relu"])
def test_select_by_code_name_and_prefix(select: str) -> None:
    exit_code, found = codes("--select", select)
    assert exit_code == 1 and "TL101" in found
    allowed = {c for c in RULES if c == "TL101" or c.startswith(select.upper()) or
               c in select.upper().split(",")}
    assert set(found) <= allowed


@pytest.mark.parametrize("ignore", ["TL101", "dead-relu", "TL1"])
def test_ignore_by_code_name_and_prefix(ignore: str) -> None:
    _exit_code, found = codes("--ignore", ignore)
    assert "TL101" not in found


def test_unknown_rule_is_a_usage_error() -> None:
    run = run_cli(["check", "fixtures/dead_relu.py", "--select", "TL999"])
    assert run.exit_code == 2 and "TL999" in run.stderr


# ------------------------------------------------------------------ exit codes

@pytest.mark.parametrize("fixture,fail_on,expected", [
    ("dead_relu", None, 1), ("dead_relu", "warning", 1), ("dead_relu", "info", 1),
    ("dead_relu", "error", 0), ("dead_relu", "never", 0),
    ("batchnorm_single_value", "error", 1), ("batchnorm_single_value", "never", 0),
    ("healthy_relu", "warning", 0),
])
def test_fail_on_levels(fixture: str, fail_on: str | None, expected: int) -> None:
    extra = ["--fail-on", fail_on] if fail_on else []
    run = run_cli(["check", f"fixtures/{fixture}.py", "--format", "json", *extra])
    assert run.exit_code == expected
    severities = {f["severity"] for f in run.doc["findings"]}
    if expected == 0 and fail_on in ("error", "warning"):
        assert "error" not in severities


def test_exit_2_for_a_missing_file_and_missing_names(tmp_path: Path) -> None:
    run = run_cli(["check", str(tmp_path / "nope.py")])
    assert run.exit_code == 2 and "not found" in run.stderr
    empty = tmp_path / "model.py"
    empty.write_text("x = 1\n")
    run = run_cli(["check", str(empty)])
    assert run.exit_code == 2
    assert "build_model" in run.stderr and "model" in run.stderr


# ------------------------------------------------------------------ config

def project(tmp_path: Path, table: str) -> Path:
    shutil.copy(FIXTURES / "dead_relu.py", tmp_path / "model.py")
    (tmp_path / "pyproject.toml").write_text(f"[project]\nname = 'user'\n\n{table}\n")
    return tmp_path


def dead_fraction() -> float:
    [finding] = [f for f in fixture_run("dead_relu").doc["findings"] if f["code"] == "TL101"]
    return finding["evidence"]["dead_fraction"]


@pytest.mark.parametrize("key", ["TL101", "dead-relu"])
def test_config_thresholds(tmp_path: Path, key: str) -> None:
    above = (dead_fraction() + 1.0) / 2
    assert above > RULES["TL101"].defaults["dead_fraction"]
    folder = project(tmp_path, f"[tool.trainlint.rules.{key}]\ndead_fraction = {above}\n")
    run = run_cli(["check", "model.py", "--format", "json"], cwd=folder)
    assert "TL101" not in [f["code"] for f in run.doc["findings"]]
    assert run.doc["target"] == "model.py"


def test_config_select_ignore_and_fail_on(tmp_path: Path) -> None:
    folder = project(tmp_path, '[tool.trainlint]\nignore = ["dead-relu"]\n')
    run = run_cli(["check", "model.py", "--format", "json"], cwd=folder)
    assert "TL101" not in [f["code"] for f in run.doc["findings"]]
    (folder / "pyproject.toml").write_text('[tool.trainlint]\nselect = ["TL4"]\n')
    run = run_cli(["check", "model.py", "--format", "json"], cwd=folder)
    assert all(f["code"].startswith("TL4") for f in run.doc["findings"])
    run = run_cli(["check", "model.py", "--format", "json", "--select", "TL101"], cwd=folder)
    assert [f["code"] for f in run.doc["findings"]] == ["TL101"], "the CLI overrides the file"
    (folder / "pyproject.toml").write_text('[tool.trainlint]\nfail-on = "error"\n'
                                           'select = ["TL101"]\n')
    run = run_cli(["check", "model.py", "--format", "json"], cwd=folder)
    assert run.exit_code == 0 and [f["code"] for f in run.doc["findings"]] == ["TL101"]


def test_the_config_nearest_the_checked_file_wins(tmp_path: Path) -> None:
    """Run from above the project (CI at a monorepo's root): its pyproject.toml beside the
    model was left out, and the finding it ignores failed the run."""
    (tmp_path / "proj").mkdir()
    project(tmp_path / "proj", '[tool.trainlint]\nignore = ["dead-relu"]\n')
    (tmp_path / "pyproject.toml").write_text('[tool.trainlint]\nselect = ["TL101"]\n')
    run = run_cli(["check", "proj/model.py", "--format", "json"], cwd=tmp_path)
    assert "TL101" not in [f["code"] for f in run.doc["findings"]]
    (tmp_path / "proj" / "pyproject.toml").write_text("[project]\nname = 'user'\n")
    run = run_cli(["check", "proj/model.py", "--format", "json"], cwd=tmp_path)
    assert [f["code"] for f in run.doc["findings"]] == ["TL101"], "else the working directory's"


def test_explicit_config_file_and_bad_threshold(tmp_path: Path) -> None:
    config = tmp_path / "lint.toml"
    config.write_text('[tool.trainlint]\nselect = ["TL101"]\n'
                      '[tool.trainlint.rules.TL101]\nmin_units = 100000\n')
    run = run_cli(["check", "fixtures/dead_relu.py", "--format", "json", "--config", config])
    assert run.exit_code == 0 and run.doc["findings"] == []
    config.write_text("[tool.trainlint.rules.TL101]\nno_such = 1\n")
    run = run_cli(["check", "fixtures/dead_relu.py", "--config", config])
    assert run.exit_code == 2 and "no_such" in run.stderr


def test_a_renamed_pyproject_without_a_trainlint_table_says_so(tmp_path: Path) -> None:
    """--config ci-pyproject.toml, a pyproject.toml copy with [tool.black] only: read as a bare
    table it once said "unknown key(s) project, tool"."""
    config = tmp_path / "ci-pyproject.toml"
    config.write_text('[project]\nname = "x"\n[tool.black]\nline-length = 100\n')
    run = run_cli(["check", "fixtures/dead_relu.py", "--config", config])
    assert run.exit_code == 2
    assert "no [tool.trainlint] table (the file has [tool] tables for black)" in run.stderr
    assert "unknown key" not in run.stderr


@pytest.mark.parametrize("value", ["nan", "-0.5", "-inf"])
def test_a_threshold_of_no_sense_is_a_config_error(tmp_path: Path, value: str) -> None:
    """NaN (every comparison false: the rule silently off or always on) or a sign the default
    does not have."""
    config = tmp_path / "lint.toml"
    config.write_text(f"[tool.trainlint.rules.TL102]\nsaturated_fraction = {value}\n")
    run = run_cli(["check", "fixtures/dead_relu.py", "--config", config])
    assert run.exit_code == 2 and "TL102.saturated_fraction" in run.stderr


# ------------------------------------------------------------------ rules / rule / --output

def test_rules_lists_every_registered_rule() -> None:
    run = run_cli(["rules"])
    assert run.exit_code == 0
    for r in load_rules().values():
        line = next((ln for ln in run.stdout.splitlines() if ln.startswith(r.code)), "")
        assert r.name in line and r.severity in line, r.code


@pytest.mark.parametrize("name", ["TL101", "dead-relu"])
def test_rule_prints_the_documentation_and_thresholds(name: str) -> None:
    run = run_cli(["rule", name])
    assert run.exit_code == 0
    for section in ("## What it does", "## Why is this bad?", "## Example", "## Fix"):
        assert section in run.stdout
    for key, value in RULES["TL101"].defaults.items():
        assert f"{key} = {value}" in run.stdout
    assert run_cli(["rule", "TL999"]).exit_code == 2


def test_output_writes_the_file(tmp_path: Path, schema_validator) -> None:
    target = tmp_path / "report.json"
    run = run_cli(["check", "fixtures/dead_relu.py", "--format", "json", "--output", target,
                   "--select", "TL101"])
    assert run.exit_code == 1 and run.stdout == ""
    doc = json.loads(target.read_text())
    schema_validator.validate(doc)
    assert [f["code"] for f in doc["findings"]] == ["TL101"]


def _refuse_files_in(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New files in ``folder`` fail as on a read-only mount (root ignores permission bits)."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if Path(kwargs.get("dir", "")).resolve() == folder.resolve():
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("option", ["--output", "--write-baseline", "--plot"])
def test_an_unwritable_file_is_refused_before_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str) -> None:
    """--output into a folder that takes no file ran the whole check, then exited 2 with
    nothing on stdout: the report was lost. --plot failed with an internal error."""
    _refuse_files_in(tmp_path, monkeypatch)
    calls = []
    monkeypatch.setattr("trainlint.runner.run_check", lambda *a: calls.append(a))
    run = run_cli(["check", "fixtures/dead_relu.py", option, tmp_path / "out.png"])
    assert run.exit_code == 2 and calls == []
    assert f"({option}): Permission denied" in run.stderr and "internal error" not in run.stderr


def test_an_empty_output_name_is_refused_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """--output "" ran the whole check, then failed: "cannot write <cwd>: Is a directory"."""
    calls = []
    monkeypatch.setattr("trainlint.runner.run_check", lambda *a: calls.append(a))
    run = run_cli(["check", "fixtures/dead_relu.py", "--output", ""])
    assert run.exit_code == 2 and calls == []
    assert "(--output): it is a folder" in run.stderr


def test_a_report_that_cannot_be_written_after_the_run_goes_to_stdout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder stopped taking files during the run: the report is not lost."""
    import trainlint.cli as cli

    def full(path: Path, text: str) -> None:
        raise TrainlintError(f"cannot write {path}: No space left on device")
    monkeypatch.setattr(cli, "write_atomic", full)
    run = run_cli(["check", "fixtures/dead_relu.py", "--format", "json", "--output",
                   tmp_path / "r.json"])
    assert run.exit_code == 2
    assert [f["code"] for f in json.loads(run.stdout)["findings"]] == ["TL101"]
    assert "the report was written to stdout instead" in run.stderr


def test_a_job_summary_that_cannot_be_written_leaves_the_exit_status_to_the_findings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "missing" / "summary.md"))
    run = run_cli(["check", "fixtures/dead_relu.py", "--format", "github", "--fail-on",
                   "never"])
    assert run.exit_code == 0, run.stderr
    assert "::warning file=fixtures/dead_relu.py" in run.stdout
    assert "warning: cannot append to $GITHUB_STEP_SUMMARY" in run.stderr


NOISY_MODEL = """
import os
import torch
import torch.nn as nn

print("hello from import")


def build_model():
    print("building")
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def get_batch(batch_size=16):
    print("a batch")
    os.chdir({away!r})
    return torch.randn(batch_size, 8), torch.randint(0, 3, (batch_size,))
"""


@pytest.mark.parametrize("fmt", ["json", "sarif"])
def test_stdout_holds_the_report_alone_and_paths_ignore_the_users_chdir(
        tmp_path: Path, fmt: str) -> None:
    """What the model prints goes to stderr, so a machine-readable report on stdout parses; a
    relative --output is where it was when trainlint started, whatever directory the user's
    code moves to."""
    away = tmp_path / "away"
    away.mkdir()
    (tmp_path / "noisy.py").write_text(NOISY_MODEL.format(away=str(away)))
    run = run_cli(["check", "noisy.py", "--format", fmt], cwd=tmp_path)
    assert run.exit_code == 0
    assert json.loads(run.stdout)  # the report alone
    assert "hello from import" in run.stderr and "a batch" in run.stderr
    run = run_cli(["check", "noisy.py", "--format", fmt, "--output", f"report.{fmt}"],
                  cwd=tmp_path)
    assert run.exit_code == 0
    assert json.loads((tmp_path / f"report.{fmt}").read_text())
    assert not (away / f"report.{fmt}").exists()


# ------------------------------------------------------------------ text report

@pytest.fixture(scope="module")
def text_runs() -> dict:
    return {name: run_cli(["check", f"fixtures/{name}.py"])
            for name in ("dead_relu", "functional_dead_relu", "init_tanh_large")}


def test_text_findings_have_each_fix_under_them(text_runs: dict) -> None:
    doc = fixture_run("dead_relu").doc
    lines = text_runs["dead_relu"].stdout.splitlines()
    for finding in doc["findings"]:
        head = next(i for i, ln in enumerate(lines)
                    if finding["code"] in ln and finding["rule"] in ln
                    and f" {finding['module']} " in ln)
        where = f"{finding['location']['path']}:{finding['location']['line']}"
        assert lines[head].startswith(finding["severity"].upper()) and where in lines[head]
        block = []
        for ln in lines[head + 1:]:
            if not ln.startswith("    "):
                break
            block.append(ln.strip())
        joined = " ".join(block)
        fix_at = joined.index("fix: ")
        assert joined[:fix_at].split() == finding["message"].split()
        assert joined[fix_at + 5:].split() == finding["fix"].split()


def test_text_layer_table_and_sparkline(text_runs: dict) -> None:
    for name, run in text_runs.items():
        layers = fixture_run(name).doc["layers"]
        lines = run.stdout.splitlines()
        header = next(i for i, ln in enumerate(lines) if ln.startswith("layer "))
        for column in ("type", "act mean", "act std", "dead", "sat", "grad norm"):
            assert column in lines[header]
        rows = lines[header + 2: header + 2 + len(layers)]
        assert [r.split()[:2] for r in rows] == [[lay["label"], lay["type"]] for lay in layers]
        spark = next(ln for ln in lines if ln.startswith("activation std along depth"))
        chars = spark.split(": ", 1)[1]
        assert len(chars) == len(layers) and set(chars) <= set(SPARKS)
        stds = [lay["activation"]["std"] for lay in layers]
        assert chars[stds.index(max(stds))] == SPARKS[-1]
        assert chars[stds.index(min(stds))] == SPARKS[0]


def test_text_lines_fit_100_columns(text_runs: dict) -> None:
    for name, run in text_runs.items():
        for line in run.stdout.splitlines():
            assert len(line) <= WIDTH or len(line.split()) == 1, f"{name}: {line!r}"


def test_text_numbers_match_the_json(text_runs: dict) -> None:
    layers = fixture_run("dead_relu").doc["layers"]
    lines = text_runs["dead_relu"].stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("layer "))
    for layer, row in zip(layers, lines[header + 2:]):
        cells = row.split()
        assert float(cells[2]) == pytest.approx(layer["activation"]["mean"], rel=5e-3, abs=1e-9)
        assert float(cells[3]) == pytest.approx(layer["activation"]["std"], rel=5e-3)
        dead = layer["activation"]["dead_fraction"]
        assert cells[4] == ("-" if dead is None else f"{100 * dead:.0f}%")
        gradient = layer["gradient"]
        if gradient is None:  # an activation's output gradient is not read (but at the output)
            assert cells[6] == "-"
        else:
            assert float(cells[6]) == pytest.approx(gradient["norm"], rel=5e-3)


@pytest.mark.parametrize("fmt", ["sarif", "junit", "json", "github"])
def test_a_file_name_that_is_not_utf8_gives_well_formed_reports(
        tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name's byte 0xff (held by Python as a lone surrogate) made SARIF, --output and the
    GitHub job summary fail with an internal error, and JUnit on stdout was no XML."""
    import xml.etree.ElementTree as ElementTree

    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    name = os.fsdecode(b"m\xffx.py")
    (tmp_path / name).write_text((FIXTURES / "dead_relu.py").read_text())
    run = run_cli(["check", name, "--format", fmt], cwd=tmp_path)
    assert run.exit_code == 1, run.stderr
    run.stdout.encode("utf-8")  # no lone surrogate left
    if fmt == "junit":
        ElementTree.fromstring(run.stdout)
    elif fmt == "github":
        assert "TL101" in summary.read_text(encoding="utf-8")
    else:
        doc = json.loads(run.stdout)
        if fmt == "sarif":
            [result] = doc["runs"][0]["results"]
            uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            assert uri == "m%FFx.py"
    out = tmp_path / f"report.{fmt}"
    assert run_cli(["check", name, "--format", fmt, "--output", out], cwd=tmp_path).exit_code == 1
    assert out.read_text(encoding="utf-8")


def test_a_learning_rate_finding_points_at_build_optimizer() -> None:
    """update_ratio_high.py imports its model from update_ratio_ok.py: TL503's annotation
    landed on the model's line in the twin, not on the rate, set in this file."""
    [found] = [f for f in fixture_run("update_ratio_high").doc["findings"] if f["code"] == "TL503"]
    lines = (FIXTURES / "update_ratio_high.py").read_text().splitlines()
    assert found["location"]["path"].endswith("update_ratio_high.py")
    assert lines[found["location"]["line"] - 1].startswith("def build_optimizer(")
