"""Temp files beside a file trainlint writes (the report, a baseline, a plot), renamed over it
once complete: readers never see a part."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import TrainlintError


def temp_beside(path: Path, option: str = "") -> tuple[int, str]:
    """``(fd, name)`` of a new temp file in the folder ``path`` is in (where a symbolic link
    points); a TrainlintError naming ``path`` (and ``option``, the CLI option that gave it)
    when that folder is missing or takes no new file."""
    given = f" ({option})" if option else ""
    folder = path.resolve().parent
    if not folder.is_dir():
        raise TrainlintError(f"cannot write {path}: folder {folder} does not exist{given}")
    try:
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise TrainlintError(f"cannot write {path}{given}: {exc.strerror or exc}") from None
