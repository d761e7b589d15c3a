"""Loading the real-architecture model.py files and running them through the API and CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch
from click.testing import CliRunner

import trainlint
from trainlint.cli import main
from trainlint.engine import RULES, load_rules
from trainlint.report import Report

MODELS = Path(__file__).resolve().parent / "models"
# Every architecture the suite must cover, by model.py file name.
ARCHITECTURES = ("hf_bert", "hf_distilbert", "hf_gpt2", "hf_t5", "hf_vit", "hf_resnet",
                 "hf_convnext", "hf_mobilenet_v2", "hf_regnet", "hf_segformer", "hf_llama",
                 "hf_swin", "hf_whisper", "hf_modernbert", "torch_transformer", "torch_lstm_lm",
                 "torch_gru_lm", "torch_densenet")
# Severities a healthy model must never get.
FAILING = ("error", "warning")


def threshold(code: str, key: str) -> Any:
    """A rule's default threshold, as registered on the rule."""
    load_rules()
    return RULES[code].defaults[key]


def model_path(name: str) -> Path:
    return MODELS / f"{name}.py"


def load(name: str) -> ModuleType:
    """Import ``models/<name>.py`` as a fresh module (its own copy of module-level state)."""
    spec = importlib.util.spec_from_file_location(f"real_models_{name}", model_path(name))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def api_check(module: ModuleType, model: Optional[torch.nn.Module] = None, batch: Any = None,
              **overrides: Any) -> Report:
    """``trainlint.check`` on what a model.py defines; keyword arguments replace its parts."""
    kwargs = {"loss_fn": getattr(module, "loss_fn", None),
              "optimizer": getattr(module, "build_optimizer", None)}
    kwargs.update(overrides)
    model = module.build_model() if model is None else model
    batch = module.get_batch() if batch is None else batch
    return trainlint.check(model, batch, **kwargs)


def cli_check(name: str, *args: str) -> tuple[int, dict]:
    """``trainlint check models/<name>.py --format json ARGS``: the exit code and the report."""
    result = CliRunner().invoke(main, ["check", str(model_path(name)), "--format", "json",
                                       *args])
    assert result.exit_code in (0, 1), (
        f"trainlint check {name} could not run (exit {result.exit_code}):\n{result.output}")
    return result.exit_code, json.loads(result.stdout)


def describe(findings: list) -> str:
    """Findings (``Finding`` objects or report dicts) as lines for an assertion message."""
    lines = []
    for f in findings:
        d = f if isinstance(f, dict) else f.to_dict()
        lines.append(f"{d['code']} {d['severity']} {d['module']!r}: {d['message']}")
    return "\n".join(lines) or "(none)"
