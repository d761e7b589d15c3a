"""Tracebacks trimmed to the user's own frames."""

from __future__ import annotations

import os
import traceback

from .origins import _is_user_file

_OWN_PACKAGE = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))


def user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` keeping only frames from the user's files.

    When none of the frames is the user's (the error came from inside a library, such as a
    shape mismatch in ``F.linear``), only the innermost frame outside trainlint is kept: the
    line that raised. trainlint's own frames are never shown.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if _is_user_file(f.filename)]
    if mine:
        header = "Traceback (most recent call last, your frames only):\n"
    else:
        mine = [f for f in frames if not _is_own(f.filename)][-1:]
        header = "Raised in library code (none of the frames is in your files):\n"
    lines = [header] if mine else []
    lines += traceback.format_list(mine)
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def flat_message(exc: BaseException) -> str:
    """The exception's text on one line (its class's ``__str__`` is user code and may fail)."""
    try:
        text = str(exc)
    except Exception as inner:  # noqa: BLE001  (whatever a broken __str__ raises)
        return f"(its message could not be shown: str() raised {type(inner).__name__})"
    return " ".join(text.split()) or "(no message)"


def raised_by_trainlint(exc: BaseException) -> bool:
    """Whether ``exc`` came out of trainlint's own hook code (a bug), not the user's.

    Past the first frame outside trainlint (the user's training step), a trainlint frame can
    only be one of its hooks; the probe's torch-function pass-through only forwards the
    user's own call and does not count. The default optimizer stands in for the user's, so
    its frames count as the training step's.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    entered = False
    for frame in frames:
        own = _is_own(frame.filename) and not _is_default_optimizer(frame.filename)
        if not own:
            entered = True
        elif entered and frame.name != "__torch_function__":
            return True
    return False


def _is_own(path: str) -> bool:
    return os.path.realpath(path).startswith(_OWN_PACKAGE + os.sep)


def _is_default_optimizer(path: str) -> bool:
    return os.path.realpath(path) == os.path.join(_OWN_PACKAGE, "default_optimizer.py")
