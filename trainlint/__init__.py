"""trainlint: a diagnostic linter for PyTorch training runs."""

from __future__ import annotations

__version__ = "0.1.0"

from .check import check  # noqa: E402
from .engine import Finding  # noqa: E402
from .errors import ConfigError, TargetError, TrainlintError, UserCodeError  # noqa: E402
from .monitor import Monitor, RunFailed  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["check", "Monitor", "RunFailed", "Report", "Finding", "TrainlintError",
           "ConfigError", "TargetError", "UserCodeError", "__version__"]
