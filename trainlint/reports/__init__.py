"""Output formats: each module renders a Report as one format, a pure function of the Report."""

from __future__ import annotations

import importlib
from typing import Callable

# format name -> module under trainlint.reports that has ``render(report, **options) -> str``
FORMATS: dict[str, str] = {
    "text": "text",
    "json": "json",
    "sarif": "sarif",
    "junit": "junit",
    "github": "github",
    "markdown": "markdown",
    "html": "html",
}


def renderer(name: str) -> Callable[..., str]:
    """The ``render`` function of one format."""
    module = importlib.import_module(f"{__name__}.{FORMATS[name]}")
    return module.render
