"""Load a ``model.py`` target: the model, the batch, the loss and the optimizer it defines."""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .errors import TargetError, UserCodeError
from .origins import recording_origins
from .usercode import flat_message, user_traceback

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
    """``path/to/model.py`` or ``path/to/model.py:NAME``, NAME after the last colon (a file
    whose name holds the colon is that file; colons in the path, a Windows drive's, stay)."""
    if Path(spec).is_file():
        return Path(spec), None
    path, _, name = spec.rpartition(":")
    if path and (name.isidentifier() or Path(path).is_file()):
        return Path(path), name or None  # (a NAME that is no identifier: find_model says so)
    return Path(spec), None


def import_file(path: Path) -> ModuleType:
    """Import ``path`` as a module with its folder on sys.path (as pytest does)."""
    if path.is_dir():
        raise TargetError(f"{path} is a folder: give the model file inside it, e.g. "
                          f"trainlint check {path / 'model.py'}")
    if not path.is_file():
        raise TargetError(f"target file not found: {path} (looked in {Path.cwd()}); TARGET is "
                          "path/to/model.py or path/to/model.py:NAME")
    if path.suffix != ".py":
        raise TargetError(f"target must be a Python file such as model.py, got {path}")
    folder = str(path.resolve().parent)
    base, package = package_of(path) if _relative_imports(path) else (Path(), "")
    if package and str(base) not in sys.path:
        sys.path.insert(0, str(base))
    if folder not in sys.path:  # ahead of the package's base: its siblings come first
        sys.path.insert(0, folder)
    name = f"{package}.{path.stem}" if package else f"trainlint_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        with recording_origins():
            if package:  # its relative imports resolve against the package, as under pytest
                importlib.import_module(package)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    except SystemExit as exc:
        sys.modules.pop(name, None)
        raise UserCodeError(f"importing {path} called sys.exit({exc.code!r}): code that runs a "
                            "script or parses the command line (argparse) at module level must "
                            "sit under `if __name__ == \"__main__\":`",
                            user_traceback(exc), phase="import") from None
    except SyntaxError as exc:  # the file does not parse: where, not a traceback
        sys.modules.pop(name, None)
        where = "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
        raise UserCodeError(f"{path} does not parse: {type(exc).__name__}: {exc.msg} (line "
                            f"{exc.lineno}); fix the error in your file",
                            f"Where it fails to parse:\n{where}", phase="import") from None
    except Exception as exc:
        sys.modules.pop(name, None)
        raise UserCodeError(f"importing {path} raised {type(exc).__name__}: "
                            f"{flat_message(exc)}; fix the error in your file (your traceback "
                            "follows)",
                            user_traceback(exc), phase="import") from exc
    return module


def _call_user(func: Callable, what: str, *args: Any, **kwargs: Any) -> Any:
    try:
        with recording_origins():
            return func(*args, **kwargs)
    except Exception as exc:
        raise UserCodeError(f"{what} raised {type(exc).__name__}: {flat_message(exc)}",
                            user_traceback(exc), phase=what) from exc


def find_model(module: ModuleType, path: Path, name: Optional[str]) -> nn.Module:
    """NAME, else ``build_model()``, else a module-level ``model``."""
    if name is not None:
        if not hasattr(module, name):
            raise TargetError(f"{path} has no name {name!r}; it defines "
                              f"{_candidates(module) or 'no module or function'}")
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
        made = f"{label}()" if label != "model" and callable(candidates[0][1]) else label
        raise TargetError(f"{made} in {path} gave {_describe(obj)}, not a torch.nn.Module: the "
                          "model must be an nn.Module (wrap a list of layers in nn.Sequential)")
    return obj


def _candidates(module: ModuleType) -> str:
    """Names in the file that could be a model: modules, classes and functions defined there."""
    names = [n for n, v in vars(module).items() if not n.startswith("_") and (
        isinstance(v, nn.Module) or (callable(v) and getattr(v, "__module__", None)
                                     == module.__name__))]
    return ", ".join(names)


def _describe(obj: Any) -> str:
    if isinstance(obj, (list, tuple)):
        kinds = ", ".join(type(v).__name__ for v in obj[:5]) + (", ..." if len(obj) > 5 else "")
        return f"a {type(obj).__name__} of {len(obj)} ({kinds})"
    return "None" if obj is None else f"a {type(obj).__name__}"


def parse_shape(text: str) -> tuple[int, ...]:
    usage = f"--input-shape must be positive integers separated by commas, like 32,3,32,32 " \
            f"(batch first); got {text!r}"
    try:  # every part a number: "3,x" or "32,,3" is a typo, not a shorter shape
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise TargetError(usage) from None
    if not shape or any(s <= 0 for s in shape):
        raise TargetError(usage)
    return shape


RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.", re.MULTILINE)


def _relative_imports(path: Path) -> bool:
    """Whether the file has a relative import (``from .layers import ...``): only then is it
    imported inside its package, whose ``__init__`` runs first."""
    try:
        return bool(RELATIVE_IMPORT.search(path.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return False


def package_of(path: Path) -> tuple[Path, str]:
    """``(base folder, dotted package)`` of a file inside packages (folders with an
    ``__init__.py``), as pytest finds them: ``pkg/sub/model.py`` is ``pkg.sub.model``, imported
    with the folder above ``pkg`` on sys.path; ``(Path(), "")`` for a file outside any."""
    parts: list = []
    folder = path.resolve().parent
    while (folder / "__init__.py").is_file() and folder.name.isidentifier():
        parts.insert(0, folder.name)
        folder = folder.parent
    return (folder, ".".join(parts)) if parts else (Path(), "")


def find_batch(module: ModuleType, path: Path, batch_size: Optional[int],
               input_shape: Optional[str],
               batch_size_from: str = "--batch-size") -> Callable[[], Any]:
    """``get_batch()`` / ``get_batch(batch_size)``, else a standard-normal ``--input-shape``
    (``batch_size_from``: where the batch size was set, for messages)."""
    get_batch = getattr(module, "get_batch", None)
    if callable(get_batch):
        try:
            params = list(inspect.signature(get_batch).parameters.values())
        except (TypeError, ValueError):
            params = None
        positional = params is None or any(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            for p in params)
        # get_batch(*, batch_size=16) or get_batch(**options): the size goes by keyword.
        by_keyword = not positional and any(
            p.kind == p.VAR_KEYWORD or (p.kind == p.KEYWORD_ONLY and p.name == "batch_size")
            for p in params)
        takes_size = positional or by_keyword
        if batch_size is not None and not takes_size:
            raise TargetError(f"{batch_size_from} is {batch_size} but get_batch() in {path} "
                              f"takes no batch size: drop {batch_size_from.split(' in ')[0]}, "
                              "or define get_batch(batch_size) to use it")
        required = [p.name for p in params or () if p.default is p.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(required) > 1:
            raise TargetError(f"get_batch({', '.join(required)}) in {path} takes "
                              f"{len(required)} arguments without defaults: trainlint calls "
                              f"get_batch() or get_batch(batch_size); give "
                              f"{', '.join(required[1:])} a default")
        if batch_size is None and required:
            raise TargetError(f"get_batch({required[0]}) in {path} needs a batch size: pass "
                              f"--batch-size N, or give {required[0]} a default")

        def batch() -> Any:
            if batch_size is not None and by_keyword:
                return _call_user(get_batch, "get_batch()", batch_size=batch_size)
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
                input_shape: Optional[str] = None,
                batch_size_from: str = "--batch-size") -> Target:
    """Everything :func:`trainlint.check` needs from a model.py (``batch_size_from``: where
    the batch size was set, for messages)."""
    path, name = parse_target(spec)
    module = import_file(path)
    model = find_model(module, path, name)
    batch = find_batch(module, path, batch_size, input_shape, batch_size_from)
    loss_fn = getattr(module, "loss_fn", None)
    if loss_fn is not None and not callable(loss_fn):
        raise TargetError(f"loss_fn in {path} is not callable")
    optimizer = getattr(module, "build_optimizer", None)
    if optimizer is not None and not callable(optimizer):
        raise TargetError(f"build_optimizer in {path} is not callable")
    target = Target(path=path, model=model, batch=batch, loss_fn=loss_fn, optimizer=optimizer)
    if input_shape is not None and callable(getattr(module, "get_batch", None)):
        target.notes.append(f"--input-shape {input_shape} was not used: get_batch() in "
                            f"{path.name} makes the batch")
    return target
