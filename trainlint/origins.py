"""Remember the user-source line that built each module (for ``file:line`` in findings)."""

from __future__ import annotations

import contextlib
import os
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


def _user_frame_location() -> Optional[Location]:
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if _is_user_file(path):
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
            location = _user_frame_location()
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
