"""Exception types: every failure trainlint reports instead of a raw traceback."""

from __future__ import annotations


class TrainlintError(Exception):
    """Base class: the check could not run (the CLI exits with status 2)."""


class ConfigError(TrainlintError):
    """Bad options or a malformed ``[tool.trainlint]`` table."""


class TargetError(TrainlintError):
    """The target file, model, batch, loss or optimizer is missing or unusable."""


class UserCodeError(TrainlintError):
    """The user's code raised; ``user_traceback`` holds the traceback trimmed to user frames."""

    def __init__(self, message: str, user_traceback: str = "", phase: str = "") -> None:
        super().__init__(message)
        self.user_traceback = user_traceback
        self.phase = phase
