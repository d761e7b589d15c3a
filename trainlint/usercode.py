"""Tracebacks trimmed to the user's own frames."""

from __future__ import annotations

import traceback

from .origins import _is_user_file


def user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` keeping only frames from the user's files (all, if none is)."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if _is_user_file(f.filename)]
    lines = ["Traceback (most recent call last, user frames only):\n"]
    lines += traceback.format_list(mine or frames)
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)
