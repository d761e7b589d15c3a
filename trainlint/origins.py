"""Remember the user-source line that built each module (for ``file:line`` in findings)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import sys
import sysconfig
import weakref
from typing import Iterator, Optional

import torch.nn as nn

from .trace import Location

_ORIGINS: weakref.WeakKeyDictionary[nn.Module, Location] = weakref.WeakKeyDictionary()

_LIBRARY_ROOTS = tuple(
    os.path.realpath(p)
    for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
              sysconfig.get_paths()["platlib"], os.path.dirname(os.path.abspath(__file__))}
    if p
)


def _is_user_file(path: str) -> bool:
    if not path or path.startswith("<"):
        return False
    real = os.path.realpath(path)
    return not real.startswith(_LIBRARY_ROOTS) and "site-packages" not in real


@functools.lru_cache(maxsize=512)
def library_of(cls: type) -> str:
    """The installed package that defines ``cls`` (``"transformers"``, ``"torch"``), or ""
    for a class of the user's own code (or one whose source is unknown)."""
    try:
        path = inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return ""
    if not path or path.startswith("<") or _is_user_file(path):
        return ""
    return cls.__module__.split(".")[0]


def _user_frame_location(module: nn.Module) -> Optional[Location]:
    """The innermost user-code frame outside ``module``'s own ``__init__`` chain (the line that
    called ``Block(...)``, not the ``super().__init__()`` inside ``Block``)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if _is_user_file(path) and frame.f_locals.get("self") is not module:
            return Location(path=path, line=frame.f_lineno)
        frame = frame.f_back
    return None


@contextlib.contextmanager
def recording_origins() -> Iterator[None]:
    """While active, every ``nn.Module`` built records the innermost user-code line that built it.

    The record lives in a weak side table: the modules themselves are not touched.
    """
    original = nn.Module.__init__

    def init(self: nn.Module, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        if self not in _ORIGINS:
            location = _user_frame_location(self)
            if location is not None:
                _ORIGINS[self] = location

    nn.Module.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__init__ = original  # type: ignore[method-assign]


def origin_of(module: nn.Module) -> Optional[Location]:
    """The recorded construction line of ``module``, if it was built while recording."""
    return _ORIGINS.get(module)


def copy_origins(src: nn.Module, dst: nn.Module) -> None:
    """Carry recorded origins over to a deep copy (module by module, same structure)."""
    for (_, a), (_, b) in zip(src.named_modules(remove_duplicate=False),
                              dst.named_modules(remove_duplicate=False)):
        loc = _ORIGINS.get(a)
        if loc is not None:
            _ORIGINS[b] = loc


def locate(root: nn.Module, name: str, module: nn.Module) -> Optional[Location]:
    """Where ``module`` (named ``name`` under ``root``) was built: the recorded line, else the
    ``self.<attr> = ...`` line in the nearest user-defined parent class, else None."""
    recorded = _ORIGINS.get(module)
    if recorded is not None:
        return recorded
    parts = name.split(".") if name else []
    while parts:
        parent = root.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else root
        found = _assignment_line(type(parent), parts[-1])
        if found is not None:
            return found
        parts = parts[:-1]
    return _class_line(type(root)) if not name else None


@functools.lru_cache(maxsize=512)
def _assignment_line(cls: type, attr: str) -> Optional[Location]:
    pattern = re.compile(rf"\b[A-Za-z_]\w*\.{re.escape(attr)}\s*(:[^=]*)?=[^=]")
    for klass in cls.__mro__:
        source = _source(klass)
        if source is None:
            continue
        path, lines, start = source
        for offset, text in enumerate(lines):
            if pattern.search(text):
                return Location(path=path, line=start + offset)
    return None


def function_line(fn: object) -> Optional[Location]:
    """Where a function of the user's files is defined (its ``def`` line), else None."""
    code = getattr(fn, "__code__", None)
    if code is None or not _is_user_file(code.co_filename):
        return None
    return Location(path=code.co_filename, line=code.co_firstlineno)


@functools.lru_cache(maxsize=512)
def _class_line(cls: type) -> Optional[Location]:
    source = _source(cls)
    return Location(path=source[0], line=source[2]) if source else None


def _source(klass: type) -> Optional[tuple]:
    try:
        path = inspect.getsourcefile(klass)
        if path is None or not _is_user_file(path):
            return None
        lines, start = inspect.getsourcelines(klass)
    except (OSError, TypeError):
        return None
    return path, lines, start
