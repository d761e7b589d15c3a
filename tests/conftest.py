"""Shared test helpers: paths, the in-process CLI, cached fixture runs, the JSON schema."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

from trainlint.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


class NoForeach(nn.Parameter):
    """A user's parameter type whose ``__torch_function__`` refuses multi-tensor (foreach) ops."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        if getattr(func, "__name__", "").startswith("_foreach"):
            raise RuntimeError("NoForeach refuses " + func.__name__)
        return super().__torch_function__(func, types, args, kwargs or {})


@dataclass
class CliRun:
    """One in-process ``trainlint`` invocation."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def doc(self) -> dict:
        return json.loads(self.stdout)


def run_cli(args: list, cwd: Optional[Path] = None) -> CliRun:
    """Invoke the click CLI in this process, in ``cwd`` (default: the repository root)."""
    runner = CliRunner()
    with _chdir(cwd or ROOT):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    return CliRun(result.exit_code, result.stdout, result.stderr)


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


_RUNS: dict = {}


def fixture_run(name: str, *extra: str) -> CliRun:
    """``trainlint check fixtures/NAME.py --format json`` (cached per session)."""
    key = (name, extra)
    if key not in _RUNS:
        _RUNS[key] = run_cli(["check", f"fixtures/{name}.py", "--format", "json", *extra])
    return _RUNS[key]


def report_schema() -> dict:
    """The report schema as shipped in the package."""
    text = resources.files("trainlint").joinpath("schema/report.schema.json").read_text()
    return json.loads(text)


@pytest.fixture(scope="session")
def schema_validator() -> jsonschema.Draft202012Validator:  # noqa: F821
    import jsonschema  # here, not at the top: a CUDA machine without it still runs the rest

    schema = report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def monitored_step(model: nn.Module, opt: torch.optim.Optimizer, monitor: object,
                   x: torch.Tensor, y: torch.Tensor) -> float:
    """One classification training step (cross-entropy) that ``monitor`` watches; its loss."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    monitor.step(loss)
    return loss.item()


def small_mlp(lr: float = 0.05, momentum: float = 0.9) -> tuple[nn.Module, torch.optim.SGD]:
    """A 20 -> 64 -> 10 ReLU MLP (seeded) and its SGD, for the Monitor tests' 64 x 20 batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
