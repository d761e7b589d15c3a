"""Reports shared by the format tests: one real run, one hand-built with every corner case."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FIXTURES, ROOT, _chdir
from trainlint.engine import Finding, load_rules
from trainlint.report import Report
from trainlint.runner import CheckOptions, run_check
from trainlint.suppress import Suppressed
from trainlint.trace import ActivationStats, LayerTrace, Location, RunTrace

TARGET = "fixtures/dead_relu.py"
# Characters every format must escape or carry: workflow-command, Markdown, XML and HTML ones.
NASTY = 'ratio 50% | <b>&amp;</b> "q" \'s\' a:b, c\r\nsecond line'


@pytest.fixture(autouse=True)
def _in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths in reports are relative to the working directory: run from the repo root; and
    never append to a real GitHub job summary when the suite itself runs in Actions."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture(scope="session")
def real_report() -> Report:
    """``trainlint check fixtures/dead_relu.py``: TL101 on module "3"."""
    with _chdir(ROOT):
        report, _ = run_check(CheckOptions(target=TARGET))
    assert ("TL101", "3") in [(f.code, f.module) for f in report.findings]
    return report


def dead_relu(report: Report) -> Finding:
    """The TL101 finding of the dead_relu fixture."""
    return next(f for f in report.findings if (f.code, f.module) == ("TL101", "3"))


def _finding(code: str, module: str, message: str, location=None, severity=None,
             evidence=None) -> Finding:
    r = load_rules()[code]
    return Finding(code=code, rule=r.name, severity=severity or r.severity, module=module,
                   message=message, fix=f"fix for {module or 'the model'}: {NASTY}",
                   location=location, evidence=evidence or {})


def _layer(module: str, type_: str, depth: int, kind, mean: float, std: float,
           grad: float, units=None) -> LayerTrace:
    act = ActivationStats(count=100, mean=mean, std=std, min=mean - 3 * std, max=mean + 3 * std,
                          zero_fraction=0.5 if kind == "relu" else 0.0, rms=math.hypot(mean, std),
                          saturated_fraction=0.4 if kind == "tanh" else None)
    return LayerTrace(module=module, type=type_, op="output", depth=depth, kind=kind,
                      activation=act, unit_ever_active=units, grad_norm=grad,
                      node=("point", module, "output", None))


def hand_trace() -> RunTrace:
    layers = [
        _layer("enc.0", "Linear", 0, None, 0.1, 2.0, 1e-1),
        _layer("enc.1", "ReLU", 1, "relu", 0.8, 1.1, 2e-2,
               units=np.array([True, False, False, False])),
        _layer("enc.2", "Linear", 2, None, -0.2, 0.5, 3e-4),
        _layer("enc.3", "Tanh", 3, "tanh", 0.0, 0.9, 5e-6),
    ]
    per_step = [{"step": s, "loss": 2.3 - 0.1 * i, "grad_norm": 1.0 / (i + 1),
                 "layers": {("enc.1", "output", None): {"std": 1.0 + i, "mean": 0.0,
                                                        "zero_fraction": 0.5},
                            ("enc.3", "output", None): {"std": 0.5, "mean": 0.0,
                                                        "zero_fraction": 0.0}}}
                for i, s in enumerate((0, 10, 20))]
    return RunTrace(layers=layers, losses=[s["loss"] for s in per_step], steps=30,
                    observed_steps=3, batch_size=8, mode="monitor", per_step=per_step,
                    model_type="Encoder")


@pytest.fixture
def hand_report() -> Report:
    """Every case a format must handle: an error, a model-level warning, an info, a path
    outside the working directory, NaN evidence, a suppressed finding, a skipped rule."""
    here = Location(path=str(FIXTURES / "dead_relu.py"), line=12)
    outside = Location(path="/nonexistent-root/elsewhere/model.py", line=7)
    error_code = next(c for c, r in load_rules().items() if r.severity == "error")
    findings = [
        _finding(error_code, "enc.0", f"first {NASTY}", here),
        _finding("TL101", "enc.1", "dead units 75%", outside,
                 evidence={"dead_fraction": 0.75, "ratio": math.nan, "big": math.inf}),
        _finding("TL103", "", "model-level: activations shrink with depth"),
        _finding("TL102", "enc.3", "saturated, shown as info", here, severity="info"),
    ]
    suppressed = [Suppressed(_finding("TL104", "enc.2", "quiet please", here), "inline",
                             "'# trainlint: ignore' comment at fixtures/dead_relu.py:12")]
    checked = sorted({f.code for f in findings} | {"TL104", "TL401"})
    return Report(findings=findings, trace=hand_trace(), target=TARGET,
                  notes=["TL401 batchnorm-small-batch not checked: no BatchNorm layer"],
                  suppressed=suppressed, checked=checked,
                  skipped={"TL401": "no BatchNorm layer"})


@pytest.fixture
def data_dir() -> Path:
    return ROOT / "tests" / "data"
