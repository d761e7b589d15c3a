"""What ``trainlint check`` does between parsing options and printing: config, target, run."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from . import baseline
from .batch import move_to
from .check import MAX_STEPS, check
from .config import Config, load_config
from .engine import Selection, resolve_codes, set_thresholds
from .errors import ConfigError, TargetError
from .report import Report, relative_path
from .reports import FORMATS, renderer
from .suppress import resolve_ignores
from .target import load_target, parse_target

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
    cli_select = _codes_from(select, "--select")
    cli_ignore = _codes_from(ignore, "--ignore")
    with _from_config(config):
        chosen = cli_select if select else (resolve_codes(config.select)
                                            if config.select else None)
        selection = Selection(select=chosen, ignore=resolve_codes(config.ignore) | cli_ignore)
        set_thresholds(selection, config.thresholds)
        selection.per_module_ignores = resolve_ignores(config.per_module_ignores)
    return selection


def _codes_from(values: list, option: str) -> set:
    try:
        return resolve_codes(values)
    except ConfigError as exc:
        raise ConfigError(f"{option}: {exc}") from None


@contextlib.contextmanager
def _from_config(config: Config) -> Iterator[None]:
    """Name the config file in errors about values that came from it."""
    try:
        yield
    except ConfigError as exc:
        where = config.path or "the config"
        raise ConfigError(f"{where}: [tool.trainlint]: {exc}") from None


def resolve_device(name: Any, what: str = "--device") -> torch.device:
    """``auto`` (cuda when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(name, str) or not (name in ("auto", "cpu", "cuda") or (
            name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"{what} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{what} is {name!r}, but CUDA is not available here (torch "
                          f"{torch.__version__}, {_cuda_build()}): use --device cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"{what} is {name!r}, but only {torch.cuda.device_count()} CUDA "
                          "device(s) are visible")
    return torch.device(name)


def _cuda_build() -> str:
    return "a CPU-only build" if torch.version.cuda is None else \
        f"built for CUDA {torch.version.cuda} but no GPU is visible"


def _positive(value: Any, what: str, upper: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ConfigError(f"{what} must be a whole number from 1 to {upper}, got {value!r}")
    return value


def _option(options: CheckOptions, config: Config, attr: str, key: str) -> tuple[Any, str]:
    """The CLI value when given, else the config's; and how to name it in an error."""
    value = getattr(options, attr)
    if value is not None:
        return value, f"--{key}"
    where = config.path or "the config"
    return config.options.get(key), f"{key} in {where} [tool.trainlint]"


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
    config = load_config(options.config, parse_target(options.target)[0].parent)
    steps, what = _option(options, config, "steps", "steps")
    steps = _positive(DEFAULT_STEPS if steps is None else steps, what, MAX_STEPS)
    batch_size, batch_size_from = _option(options, config, "batch_size", "batch-size")
    batch_size = _positive(batch_size, batch_size_from, 1 << 20)
    seed, what = _option(options, config, "seed", "seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**32):
        raise ConfigError(f"{what} must be a whole number from 0 to 2**32 - 1, got {seed!r}")
    seed = 0 if seed is None else seed
    device, what = _option(options, config, "device", "device")
    device = resolve_device("auto" if device is None else device, what)
    fail_on = options.fail_on or config.fail_on or "warning"
    if options.fmt not in FORMATS:
        raise ConfigError(f"--format {options.fmt} is not available in this version "
                          f"(available: {', '.join(FORMATS)})")
    selection = selection_from(config, options.select, options.ignore)
    known = baseline.load(options.baseline) if options.baseline is not None else None
    seed_everything(seed)
    start = os.getcwd()
    try:
        target = load_target(options.target, batch_size=batch_size,
                             input_shape=options.input_shape, batch_size_from=batch_size_from)
        model = target.model
        try:
            model = model.to(device)
        except RuntimeError as exc:
            raise TargetError(f"cannot move the model to {device}: {exc}") from exc
        report = check(model, lambda: move_to(target.batch(), device), loss_fn=target.loss_fn,
                       optimizer=target.optimizer, steps=steps, selection=selection,
                       target=str(target.path), notes=target.notes)
    finally:  # the model's code may move it (os.chdir to its data): paths are the caller's
        with contextlib.suppress(OSError):
            os.chdir(start)
    report.target = relative_path(str(target.path))
    if known is not None:
        baseline.apply(report, known)
    return report, fail_on


def render(report: Report, fmt: str, **options: Any) -> str:
    return renderer(fmt)(report, **options)
