"""Inline ``# trainlint: ignore`` comments and per-module-ignores: kept, counted, never lost."""

from __future__ import annotations

import builtins
import importlib.util
import json
import sys
from pathlib import Path

import pytest

import trainlint
from tests.conftest import FIXTURES, run_cli
from trainlint import suppress
from trainlint.engine import Finding, Selection, load_rules
from trainlint.errors import ConfigError
from trainlint.trace import Location

SOURCE = """\
import torch.nn as nn
bn = nn.BatchNorm1d(4)  # trainlint: ignore[TL401]
relu = nn.ReLU()  # trainlint: ignore
tanh = nn.Tanh()  # TRAINLINT: Ignore[saturated-activation, TL10]
lin = nn.Linear(4, 4)  # trainlint: ignore[TL999, TL401]
plain = nn.ReLU()
text = "# trainlint: ignore[TL101]"  # a marker in a string is not a comment
"""


def _finding(code: str, module: str, line=None, path=None) -> Finding:
    r = load_rules()[code]
    location = Location(path=str(path), line=line) if line is not None else None
    return Finding(code=code, rule=r.name, severity=r.severity, module=module,
                   message="m", fix="f", location=location)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "model.py"
    path.write_text(SOURCE, encoding="utf-8")
    return path


def _split(findings: list, ignores=None) -> tuple[list, list, list]:
    kept, suppressed, notes = suppress.apply_suppressions(findings, ignores)
    assert len(kept) + len(suppressed) == len(findings)  # nothing is dropped
    return [(f.code, f.module) for f in kept], [(s.finding.code, s.finding.module)
                                                for s in suppressed], notes


def test_bracketed_codes_suppress_only_those(source: Path) -> None:
    kept, gone, _ = _split([_finding("TL401", "bn", 2, source),
                            _finding("TL101", "bn", 2, source)])
    assert gone == [("TL401", "bn")] and kept == [("TL101", "bn")]


def test_bare_ignore_suppresses_every_rule(source: Path) -> None:
    kept, gone, _ = _split([_finding(c, "relu", 3, source) for c in ("TL101", "TL103", "TL404")])
    assert kept == [] and len(gone) == 3


def test_names_prefixes_and_case_are_accepted(source: Path) -> None:
    kept, gone, _ = _split([_finding(c, "tanh", 4, source)
                            for c in ("TL102", "TL101", "TL104", "TL401")])
    assert {c for c, _ in gone} == {"TL102", "TL101", "TL104"} and kept == [("TL401", "tanh")]


def test_unknown_codes_are_reported_and_the_rest_still_apply(source: Path) -> None:
    kept, gone, notes = _split([_finding("TL401", "lin", 5, source)])
    assert gone == [("TL401", "lin")] and kept == []
    assert len(notes) == 1 and "TL999" in notes[0] and notes[0].endswith(
        "unknown rule 'TL999' in a '# trainlint: ignore' comment")


@pytest.mark.parametrize("comment, suppressed", [
    ("# trainlint: ignore [TL102]", {"TL102"}),  # a space before the list
    ("# trainlint: ignore  legacy layer, see #12", {"TL101", "TL102"}),  # a bare one, a reason
    ("# trainlint: ignore (kept on purpose, see the design doc)", {"TL101", "TL102"}),
    ("# trainlint: ignore. reason", {"TL101", "TL102"}),
    ("# trainlint: ignore; reason", {"TL101", "TL102"}),
    ("# trainlint: ignore (dead-relu)", None),
    ("# trainlint: ignore:TL9", None),
    ("# trainlint: ignore[TL102", None),
    ("# trainlint: ignore: TL102", None),
    ("# trainlint: ignore(TL102)", None),
    ("# trainlint: ignore=TL102", None),
    ("# trainlint: ignore-TL102", None),
])
def test_a_malformed_code_list_suppresses_nothing_and_says_so(
        tmp_path: Path, comment: str, suppressed) -> None:  # noqa: ANN001
    """A typo in the code list once read as a bare ignore: every rule on the line went
    silent, with no note."""
    path = tmp_path / "model.py"
    path.write_text(f"import torch.nn as nn\nact = nn.Tanh()  {comment}\n", encoding="utf-8")
    kept, gone, notes = _split([_finding(c, "act", 2, path) for c in ("TL101", "TL102")])
    if suppressed is None:
        assert gone == [] and len(kept) == 2
        assert len(notes) == 1 and "malformed '# trainlint: ignore' comment" in notes[0]
    else:
        assert {c for c, _ in gone} == suppressed and notes == []


def test_other_lines_and_unlocated_findings_stay(source: Path) -> None:
    findings = [_finding("TL101", "plain", 6, source), _finding("TL101", "x", None),
                _finding("TL101", "far", 99, source),
                _finding("TL101", "gone", 2, source.parent / "missing.py")]
    kept, gone, _ = _split(findings)
    assert gone == [] and len(kept) == 4


def test_a_marker_inside_a_string_is_no_comment(source: Path) -> None:
    kept, gone, _ = _split([_finding("TL101", "text", 7, source)])
    assert gone == [] and kept == [("TL101", "text")]


def test_source_that_does_not_tokenize_falls_back_to_the_first_hash() -> None:
    comments = suppress.comments_by_line('x = """\nlayer = 1  # trainlint: ignore\n')
    assert comments == {2: "# trainlint: ignore"}


def test_each_file_is_read_once(source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list = []

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(suppress, "open", counting_open, raising=False)
    _split([_finding("TL101", m, line, source) for m, line in
            (("bn", 2), ("relu", 3), ("tanh", 4), ("plain", 6))])
    assert opened == [str(source)]


def test_per_module_globs() -> None:
    findings = [_finding("TL401", "encoder.0.bn", 1), _finding("TL401", "decoder.0.bn", 1),
                _finding("TL101", "encoder.1", 1), _finding("TL103", "", 1)]
    for f in findings:
        f.location = None
    kept, gone, _ = _split(findings, {"encoder.*": ["batchnorm-small-batch"], "": ["TL1"]})
    assert gone == [("TL401", "encoder.0.bn"), ("TL103", "")]
    assert kept == [("TL401", "decoder.0.bn"), ("TL101", "encoder.1")]


def test_unknown_codes_in_per_module_ignores_raise() -> None:
    with pytest.raises(ConfigError, match="TL999"):
        suppress.resolve_ignores({"encoder.*": ["TL999"]})


@pytest.fixture
def fixture_model(monkeypatch: pytest.MonkeyPatch):
    """fixtures/report_suppressed.py imported as a user would (registered in sys.modules, so
    its classes have source files)."""
    spec = importlib.util.spec_from_file_location("report_suppressed",
                                                  FIXTURES / "report_suppressed.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_api_and_cli_agree_on_inline_suppression(fixture_model) -> None:
    module = fixture_model
    report = trainlint.check(module.build_model(), module.get_batch())
    assert [(s.finding.code, s.finding.module, s.kind) for s in report.suppressed] == [
        ("TL101", "act1", "inline")]
    assert ("TL101", "act2") in [(f.code, f.module) for f in report.findings]
    assert ("TL101", "act1") not in [(f.code, f.module) for f in report.findings]
    assert "1 suppressed" in str(report)

    run = run_cli(["check", "fixtures/report_suppressed.py", "--format", "json"])
    doc = json.loads(run.stdout)
    assert doc["summary"]["suppressed"] == 1
    assert [(f["code"], f["module"]) for f in doc["findings"]] == [
        (f.code, f.module) for f in report.findings]
    assert run.exit_code == 1


def test_the_text_report_counts_suppressed_findings_when_none_is_left(fixture_model) -> None:
    """Every finding suppressed: the text said only 'No findings.' while JSON counted them."""
    module = fixture_model
    selection = Selection(select={"TL101"}, per_module_ignores={"act2": ["TL101"]})
    report = trainlint.check(module.build_model(), module.get_batch(), selection=selection)
    assert report.findings == [] and len(report.suppressed) == 2
    assert "No findings (2 suppressed)." in str(report)


def test_cli_per_module_ignores_from_config(tmp_path: Path) -> None:
    config = tmp_path / "trainlint.toml"
    config.write_text('[tool.trainlint.per-module-ignores]\n"act*" = ["dead-relu"]\n',
                      encoding="utf-8")
    run = run_cli(["check", "fixtures/report_suppressed.py", "--format", "json",
                   "--config", config])
    doc = json.loads(run.stdout)
    assert doc["summary"]["suppressed"] == 2
    assert "TL101" not in [f["code"] for f in doc["findings"]]
    bad = tmp_path / "bad.toml"
    bad.write_text('[tool.trainlint.per-module-ignores]\n"act*" = ["TL999"]\n',
                   encoding="utf-8")
    run = run_cli(["check", "fixtures/report_suppressed.py", "--config", bad])
    assert run.exit_code == 2 and "TL999" in run.stderr


def test_selection_carries_per_module_ignores_for_the_api(fixture_model) -> None:
    selection = Selection(per_module_ignores={"act2": ["TL101"]})
    report = trainlint.check(fixture_model.build_model(), fixture_model.get_batch(),
                             selection=selection)
    kinds = {(s.finding.module, s.kind) for s in report.suppressed}
    assert kinds == {("act1", "inline"), ("act2", "config")}


def test_a_source_file_is_tokenized_again_only_when_it_changes(tmp_path) -> None:
    """Reports built one after another (a Monitor with fail_on builds one per observed step)
    read a model file's comments once, and again once it is edited."""
    path = tmp_path / "model.py"
    path.write_text("layer = 1  # trainlint: ignore[TL101]\n")
    first = suppress.file_comments(str(path))
    assert first == {1: "# trainlint: ignore[TL101]"}
    assert suppress.file_comments(str(path)) is first  # unchanged: not read again
    path.write_text("layer = 1\nother = 2  # trainlint: ignore\n")
    assert suppress.file_comments(str(path)) == {2: "# trainlint: ignore"}
    assert suppress.file_comments(str(tmp_path / "missing.py")) == {}
