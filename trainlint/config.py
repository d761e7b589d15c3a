"""``[tool.trainlint]`` from the nearest pyproject.toml (or an explicit file)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older Pythons only
    import tomli as tomllib

KNOWN_KEYS = {"select", "ignore", "fail-on", "rules", "per-module-ignores", "steps",
              "batch-size", "seed", "device"}


@dataclass
class Config:
    """The settings read from a config file; CLI options override them."""

    path: Optional[Path] = None
    select: Optional[list] = None
    ignore: list = field(default_factory=list)
    fail_on: Optional[str] = None
    thresholds: dict = field(default_factory=dict)
    per_module_ignores: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)


def find_pyproject(start: Path) -> Optional[Path]:
    """The nearest pyproject.toml at or above ``start`` that has a [tool.trainlint] table."""
    for folder in [start, *start.parents]:
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            try:
                data = tomllib.loads(candidate.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
                raise ConfigError(f"{candidate}: not valid TOML ({exc})") from None
            if "trainlint" in data.get("tool", {}):
                return candidate
    return None


def load_config(path: Optional[Path] = None, start: Optional[Path] = None) -> Config:
    """Read ``[tool.trainlint]`` from ``path`` or from the nearest pyproject.toml at or above
    ``start`` (the checked file's folder), else at or above the working directory."""
    if path is None:
        folders = [(start or Path.cwd()).resolve()]
        if start is not None:
            folders.append(Path.cwd().resolve())
        path = next((found for found in map(find_pyproject, folders) if found), None)
        if path is None:
            return Config()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    tool = data.get("tool")
    if isinstance(tool, dict) and "trainlint" not in tool and path.name != "pyproject.toml":
        # A copy of a pyproject.toml under another name: its top level is no trainlint table.
        raise ConfigError(f"{path}: no [tool.trainlint] table (the file has [tool] tables for "
                          f"{', '.join(sorted(tool))}); add one, or write the settings at the "
                          "top level of a file without a [tool] table")
    table = data.get("tool", {}).get("trainlint", data if path.name != "pyproject.toml" else {})
    return parse_table(table, path)


def parse_table(table: Any, path: Optional[Path] = None) -> Config:
    """Validate a ``[tool.trainlint]`` table into a Config."""
    where = f"{path}: [tool.trainlint]" if path else "[tool.trainlint]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(KNOWN_KEYS))}")
    config = Config(path=path)
    for key in ("select", "ignore"):
        if key in table:
            value = table[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: {key} must be a list of rule codes or names")
            setattr(config, key, value)
    if "fail-on" in table:
        if table["fail-on"] not in ("error", "warning", "info", "never"):
            raise ConfigError(f"{where}: fail-on must be error, warning, info or never")
        config.fail_on = table["fail-on"]
    rules = table.get("rules", {})
    if not isinstance(rules, dict) or not all(isinstance(v, dict) for v in rules.values()):
        raise ConfigError(f"{where}: rules must hold one table per rule, e.g. "
                          "[tool.trainlint.rules.TL101] dead_fraction = 0.5")
    config.thresholds = rules
    ignores = table.get("per-module-ignores", {})
    if not isinstance(ignores, dict) or not all(
            isinstance(v, list) and all(isinstance(c, str) for c in v) for v in ignores.values()):
        raise ConfigError(f"{where}: per-module-ignores maps module globs to lists of codes")
    config.per_module_ignores = ignores
    config.options = {k: table[k] for k in ("steps", "batch-size", "seed", "device") if k in table}
    return config
