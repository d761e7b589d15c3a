"""The JSON report: the schema is strict, the document is valid and consistent with the run."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import torch
import torch.nn as nn

import trainlint
from tests.conftest import ROOT, fixture_run, report_schema, run_cli
from trainlint.engine import Selection
from trainlint.report import build_report
from trainlint.trace import ActivationStats, LayerTrace, ModuleFacts, RunTrace


def test_schema_ships_with_the_package_and_is_valid() -> None:
    schema = report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"schema/*.json"' in pyproject


@pytest.fixture(scope="module")
def doc() -> dict:
    return fixture_run("dead_relu").doc


def _mutations(doc: dict) -> list:
    """(description, function that breaks a copy of the document)."""
    def drop(*path: object):
        def apply(d: dict) -> None:
            for key in path[:-1]:
                d = d[key]
            del d[path[-1]]
        return apply

    def put(value: object, *path: object):
        def apply(d: dict) -> None:
            for key in path[:-1]:
                d = d[key]
            d[path[-1]] = value
        return apply

    out = [(f"missing {key}", drop(key)) for key in doc]
    out += [(f"missing run.{key}", drop("run", key)) for key in doc["run"]]
    out += [(f"missing summary.{key}", drop("summary", key)) for key in doc["summary"]]
    out += [(f"missing finding.{key}", drop("findings", 0, key)) for key in doc["findings"][0]]
    out += [(f"missing layer.{key}", drop("layers", 0, key)) for key in doc["layers"][0]]
    out += [(f"missing activation.{key}", drop("layers", 0, "activation", key))
            for key in doc["layers"][0]["activation"]]
    out += [
        ("version 2", put(2, "version")),
        ("misspelled findings", lambda d: d.__setitem__("findngs", d.pop("findings"))),
        ("extra top-level key", put(1, "extra")),
        ("severity fatal", put("fatal", "findings", 0, "severity")),
        ("code without TL", put("101", "findings", 0, "code")),
        ("rule with spaces", put("dead relu", "findings", 0, "rule")),
        ("line as string", put("12", "findings", 0, "location", "line")),
        ("line 0", put(0, "findings", 0, "location", "line")),
        ("location as string", put("a.py:3", "findings", 0, "location")),
        ("evidence as list", put([], "findings", 0, "evidence")),
        ("empty fix", put("", "findings", 0, "fix")),
        ("count as float", put(1.5, "layers", 0, "activation", "count")),
        ("zero fraction > 1", put(1.5, "layers", 0, "activation", "zero_fraction")),
        ("mean as text", put("big", "layers", 0, "activation", "mean")),
        ("summary as string", put("0", "summary", "error")),
        ("steps negative", put(-1, "run", "steps")),
        ("notes not strings", put([1], "run", "notes")),
        ("gradient without norm", put({"rms": 1.0}, "layers", 0, "gradient")),
        ("tool name", put("other", "tool", "name")),
    ]
    return out


def test_real_document_is_valid(doc: dict, schema_validator) -> None:
    schema_validator.validate(doc)
    assert doc["findings"] and doc["layers"], "the mutations below need both"


def test_schema_rejects_missing_and_mistyped_fields(doc: dict, schema_validator) -> None:
    for what, breaks in _mutations(doc):
        broken = copy.deepcopy(doc)
        breaks(broken)
        assert not schema_validator.is_valid(broken), what


def test_summary_and_layers_agree_with_the_report(doc: dict) -> None:
    for severity in ("error", "warning", "info"):
        assert doc["summary"][severity] == sum(f["severity"] == severity
                                               for f in doc["findings"])
    depths = [layer["depth"] for layer in doc["layers"]]
    assert depths == sorted(depths)
    assert doc["run"]["steps"] == doc["run"]["observed_steps"] == 3
    assert doc["run"]["batch_size"] == 32 and doc["run"]["device"] == "cpu"


def _nonfinite_report() -> trainlint.Report:
    act = ActivationStats(count=10, mean=0.0, std=float("inf"), min=float("nan"),
                          max=float("nan"), zero_fraction=0.0, nonfinite=4, rms=float("inf"))
    layer = LayerTrace(module="fc", type="Linear", op="output", depth=0, activation=act,
                       grad_norm=float("nan"), grad_rms=float("-inf"),
                       node=("point", "fc", "output", None))
    trace = RunTrace(layers=[layer], steps=1, observed_steps=1,
                     modules={"fc": ModuleFacts("fc", "Linear", True, True)})
    return build_report(trace, Selection(select=set()))


def test_nonfinite_numbers_are_strings_and_the_document_stays_valid(schema_validator) -> None:
    def no_constants(name: str) -> None:
        raise AssertionError(f"bare {name} in JSON")

    doc = json.loads(_nonfinite_report().to_json(), parse_constant=no_constants)
    schema_validator.validate(doc)
    [layer] = doc["layers"]
    assert layer["activation"]["std"] == "inf" and layer["activation"]["min"] == "nan"
    assert layer["gradient"] == {"norm": "nan", "rms": "-inf"}


def test_a_gradient_with_nan_has_no_finite_norm_in_the_layers() -> None:
    """sqrt of a sum of squares at 0: a finite forward, a NaN gradient; the table must not
    show the norm of the gradient's finite part (0) as if nothing happened."""
    class Distance(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return ((h - h.detach()) ** 2).sum(1, keepdim=True).sqrt()

    torch.manual_seed(0)
    report = trainlint.check(Distance(), (torch.randn(8, 4), torch.randn(8, 1)), steps=1)
    row = next(r for r in json.loads(report.to_json())["layers"] if r["module"] == "fc")
    assert row["gradient"] == {"norm": "nan", "rms": "nan"}


def test_api_json_matches_the_cli_shape(schema_validator) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    report = trainlint.check(model, (torch.randn(6, 4), torch.randn(6, 2)), steps=2)
    doc = json.loads(report.to_json())
    schema_validator.validate(doc)
    assert doc["target"] == "" and doc["run"]["steps"] == 2
    assert [layer["module"] for layer in doc["layers"]] == ["0", "1", "2"]
    assert doc["layers"][1]["activation"]["saturated_fraction"] is not None
    assert doc["layers"][0]["activation"]["saturated_fraction"] is None
    assert "default loss: mean squared error" in doc["run"]["notes"]


def test_paths_are_relative_below_the_working_directory(tmp_path: Path,
                                                        schema_validator) -> None:
    inside = fixture_run("dead_relu").doc
    assert inside["target"] == "fixtures/dead_relu.py"
    assert inside["findings"][0]["location"]["path"] == "fixtures/dead_relu.py"
    outside = run_cli(["check", ROOT / "fixtures" / "dead_relu.py", "--format", "json",
                       "--select", "TL101"], cwd=tmp_path)
    doc = outside.doc
    schema_validator.validate(doc)
    assert os.path.isabs(doc["target"])
    assert os.path.isabs(doc["findings"][0]["location"]["path"])


def test_paths_outside_the_working_directory_are_absolute_without_dot_dots(tmp_path) -> None:
    """Run from a sibling folder: the location read '<cwd>/../repo/fixtures/dead_relu.py'."""
    import os

    from trainlint.report import relative_path

    here = tmp_path / "here"
    here.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(here)
        assert relative_path("../there/model.py") == str(tmp_path / "there" / "model.py")
        assert relative_path(str(here / "sub" / ".." / "model.py")) == "model.py"
    finally:
        os.chdir(cwd)
