"""Load a ``model.py`` target: the model, the batch, the loss and the optimizer it defines."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .errors import TargetError, UserCodeError
from .origins import recording_origins
from .usercode import user_traceback

MODEL_NAMES = ("build_model", "model")


@dataclass
class Target:
    """What a model.py provides, ready for :func:`trainlint.check`."""

    path: Path
    model: nn.Module
    batch: Callable[[], Any]
    loss_fn: Optional[Callable] = None
    optimizer: Optional[Callable] = None
    notes: list = field(default_factory=list)


def parse_target(spec: str) -> tuple[Path, Optional[str]]:
    """``path/to/model.py`` or ``path/to/model.py:NAME``."""
    path, _, name = spec.partition(":") if spec.count(":") == 1 and not _drive(spec) else (
        spec, "", "")
    return Path(path), (name or None)


def _drive(spec: str) -> bool:
    return len(spec) > 1 and spec[1] == ":" and spec[0].isalpha()


def import_file(path: Path) -> ModuleType:
    """Import ``path`` as a module with its folder on sys.path (as pytest does)."""
    if not path.is_file():
        raise TargetError(f"target file not found: {path}")
    if path.suffix != ".py":
        raise TargetError(f"target must be a Python file (model.py), got {path}")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"trainlint_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with recording_origins():
            spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise UserCodeError(f"importing {path} raised {type(exc).__name__}: {exc}",
                            user_traceback(exc), phase="import") from exc
    return module


def _call_user(func: Callable, what: str, *args: Any, **kwargs: Any) -> Any:
    try:
        with recording_origins():
            return func(*args, **kwargs)
    except Exception as exc:
        raise UserCodeError(f"{what} raised {type(exc).__name__}: {exc}",
                            user_traceback(exc), phase=what) from exc


def find_model(module: ModuleType, path: Path, name: Optional[str]) -> nn.Module:
    """NAME, else ``build_model()``, else a module-level ``model``."""
    if name is not None:
        if not hasattr(module, name):
            raise TargetError(f"{path} has no name {name!r}")
        candidates = [(name, getattr(module, name))]
    else:
        candidates = [(n, getattr(module, n)) for n in MODEL_NAMES if hasattr(module, n)]
        if not candidates:
            raise TargetError(
                f"no model found in {path}: define build_model() returning an nn.Module, a "
                f"module-level `model`, or name one with {path}:NAME (looked for: "
                f"{', '.join(MODEL_NAMES)})")
    label, obj = candidates[0]
    if not isinstance(obj, nn.Module) and callable(obj) and not isinstance(obj, type):
        obj = _call_user(obj, f"{label}()")
    elif isinstance(obj, type) and issubclass(obj, nn.Module):
        obj = _call_user(obj, f"{label}()")
    if isinstance(obj, torch.jit.ScriptModule):
        return obj
    if not isinstance(obj, nn.Module):
        raise TargetError(f"{label} in {path} gave {type(obj).__name__}, not a torch.nn.Module")
    return obj


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise TargetError(f"--input-shape must be integers like 32,3,32,32, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise TargetError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def find_batch(module: ModuleType, path: Path, batch_size: Optional[int],
               input_shape: Optional[str]) -> Callable[[], Any]:
    """``get_batch()`` / ``get_batch(batch_size)``, else a standard-normal ``--input-shape``."""
    get_batch = getattr(module, "get_batch", None)
    if callable(get_batch):
        takes_size = len(inspect.signature(get_batch).parameters) > 0
        if batch_size is not None and not takes_size:
            raise TargetError(f"--batch-size given but get_batch() in {path} takes no batch_size")

        def batch() -> Any:
            if batch_size is not None:
                return _call_user(get_batch, "get_batch()", batch_size)
            return _call_user(get_batch, "get_batch()")

        return batch
    if input_shape is not None:
        shape = parse_shape(input_shape)
        if batch_size is not None:
            shape = (batch_size,) + shape[1:]
        return lambda: torch.randn(*shape)
    raise TargetError(f"no batch: define get_batch() in {path}, or pass --input-shape "
                      "(e.g. --input-shape 32,3,32,32)")


def load_target(spec: str, *, batch_size: Optional[int] = None,
                input_shape: Optional[str] = None) -> Target:
    """Everything :func:`trainlint.check` needs from a model.py."""
    path, name = parse_target(spec)
    module = import_file(path)
    model = find_model(module, path, name)
    batch = find_batch(module, path, batch_size, input_shape)
    loss_fn = getattr(module, "loss_fn", None)
    if loss_fn is not None and not callable(loss_fn):
        raise TargetError(f"loss_fn in {path} is not callable")
    optimizer = getattr(module, "build_optimizer", None)
    if optimizer is not None and not callable(optimizer):
        raise TargetError(f"build_optimizer in {path} is not callable")
    return Target(path=path, model=model, batch=batch, loss_fn=loss_fn, optimizer=optimizer)
