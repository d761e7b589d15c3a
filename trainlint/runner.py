"""What ``trainlint check`` does between parsing options and printing: config, target, run."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import baseline
from .batch import move_to
from .check import check
from .config import Config, load_config
from .engine import Selection, resolve_codes, set_thresholds
from .errors import ConfigError, TargetError
from .report import Report
from .reports import FORMATS, renderer
from .suppress import resolve_ignores
from .target import load_target

DEFAULT_STEPS = 3


@dataclass
class CheckOptions:
    target: str
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    input_shape: Optional[str] = None
    device: Optional[str] = None
    seed: Optional[int] = None
    fmt: str = "text"
    select: list = field(default_factory=list)
    ignore: list = field(default_factory=list)
    fail_on: Optional[str] = None
    config: Optional[Path] = None
    baseline: Optional[Path] = None


def selection_from(config: Config, select: list, ignore: list) -> Selection:
    """CLI --select/--ignore override the config's lists; thresholds come from the config."""
    chosen = select or config.select
    selection = Selection(select=resolve_codes(chosen) if chosen else None,
                          ignore=resolve_codes(list(config.ignore) + list(ignore)))
    set_thresholds(selection, config.thresholds)
    selection.per_module_ignores = resolve_ignores(config.per_module_ignores)
    return selection


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but CUDA is not available here")
    return torch.device(name)


def _positive(value: Any, what: str, upper: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ConfigError(f"{what} must be a whole number from 1 to {upper}, got {value!r}")
    return value


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def run_cli_check(options: CheckOptions) -> tuple[str, int]:
    """Run the check the CLI describes; return the rendered report and the exit status."""
    report, fail_on = run_check(options)
    return render(report, options.fmt, fail_on=fail_on), report.exit_code(fail_on)


def run_check(options: CheckOptions) -> tuple[Report, str]:
    """Run the check the CLI describes; return the report (baseline applied) and ``fail_on``."""
    config = load_config(options.config)
    merged = {**config.options}
    steps = _positive(options.steps if options.steps is not None else
                      merged.get("steps", DEFAULT_STEPS), "--steps", 1000)
    batch_size = _positive(options.batch_size if options.batch_size is not None else
                           merged.get("batch-size"), "--batch-size", 1 << 20)
    seed = options.seed if options.seed is not None else merged.get("seed", 0)
    device = resolve_device(options.device or merged.get("device", "auto"))
    fail_on = options.fail_on or config.fail_on or "warning"
    if options.fmt not in FORMATS:
        raise ConfigError(f"--format {options.fmt} is not available in this version "
                          f"(available: {', '.join(FORMATS)})")
    selection = selection_from(config, options.select, options.ignore)
    known = baseline.load(options.baseline) if options.baseline is not None else None
    seed_everything(seed)
    target = load_target(options.target, batch_size=batch_size, input_shape=options.input_shape)
    model = target.model
    try:
        model = model.to(device)
    except RuntimeError as exc:
        raise TargetError(f"cannot move the model to {device}: {exc}") from exc
    report = check(model, lambda: move_to(target.batch(), device), loss_fn=target.loss_fn,
                   optimizer=target.optimizer, steps=steps, selection=selection,
                   target=str(target.path), notes=target.notes)
    if known is not None:
        baseline.apply(report, known)
    return report, fail_on


def render(report: Report, fmt: str, **options: Any) -> str:
    return renderer(fmt)(report, **options)
