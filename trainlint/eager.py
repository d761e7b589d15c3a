"""``torch.compiler.set_stance("force_eager")`` held by any number of Monitors at once.

The stance is process-wide. Each Monitor holds it from the start of an observed step to its
end; holders may finish in any order (two Monitors of a GAN's two models), so the stance in
force before the first holder is restored when the last one lets go, never in between. A
holder dropped without letting go (a Monitor that is garbage-collected) lets go then.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

import torch

_lock = threading.Lock()
_holders: set = set()
_restore: Any = None


def available() -> bool:
    """Whether torch has ``set_stance`` (torch >= 2.6) and Dynamo is loaded at all."""
    return hasattr(torch.compiler, "set_stance") and "torch._dynamo" in sys.modules


class EagerHold:
    """One holder's claim on the eager stance: :meth:`take` and :meth:`release` (idempotent)."""

    def __init__(self) -> None:
        self._token = object()
        weakref.finalize(self, _release, self._token)

    def take(self) -> None:
        global _restore
        if not available():
            return
        with _lock:
            if self._token in _holders:
                return
            if not _holders:
                _restore = torch.compiler.set_stance("force_eager")
            _holders.add(self._token)

    def release(self) -> None:
        _release(self._token)


def _release(token: object) -> None:
    global _restore
    with _lock:
        if token not in _holders:
            return
        _holders.discard(token)
        if not _holders and _restore is not None:
            restore, _restore = _restore, None
            restore.__exit__(None, None, None)
