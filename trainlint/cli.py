"""The ``trainlint`` command line: parse, call the library, choose the exit code."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import click
from tabulate import tabulate

from .errors import TrainlintError, UserCodeError

FORMAT_CHOICES = ["text", "json", "sarif", "junit", "github", "markdown", "html"]


def _fail(exc: TrainlintError) -> None:
    click.echo(f"trainlint: error: {exc}", err=True)
    if isinstance(exc, UserCodeError) and exc.user_traceback:
        click.echo(exc.user_traceback.rstrip(), err=True)
    sys.exit(2)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: all or nothing."""
    folder = path.resolve().parent
    if not folder.is_dir():
        raise TrainlintError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _codes(values: tuple, option: str) -> list:
    out: list = []
    for value in values:
        out += [v for v in value.split(",") if v.strip()]
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trainlint", prog_name="trainlint")
def main() -> None:
    """trainlint: a diagnostic linter for PyTorch training runs."""


@main.command()
@click.argument("target")
@click.option("--steps", type=int, default=None, help="Training steps to run (default 3).")
@click.option("--batch-size", type=int, default=None, help="Passed to get_batch(batch_size).")
@click.option("--input-shape", default=None, help="Random-normal batch shape, e.g. 32,3,32,32.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="auto = cuda when available.")
@click.option("--seed", type=int, default=None, help="Seed for torch, numpy and random (0).")
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default="text")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here (atomically) instead of stdout.")
@click.option("--select", multiple=True, help="Rule codes/names to run (comma-separated).")
@click.option("--ignore", multiple=True, help="Rule codes/names to skip (comma-separated).")
@click.option("--fail-on", type=click.Choice(["error", "warning", "info", "never"]),
              default=None, help="Lowest severity that makes the exit status 1 (warning).")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A TOML file with a [tool.trainlint] table (default: nearest pyproject.toml).")
def check(target: str, steps: Optional[int], batch_size: Optional[int],
          input_shape: Optional[str], device: Optional[str], seed: Optional[int], fmt: str,
          output: Optional[Path], select: tuple, ignore: tuple, fail_on: Optional[str],
          config: Optional[Path]) -> None:
    """Run a few training steps of TARGET (model.py or model.py:NAME) and lint them."""
    from .runner import CheckOptions, run_cli_check

    options = CheckOptions(target=target, steps=steps, batch_size=batch_size,
                           input_shape=input_shape, device=device, seed=seed, fmt=fmt,
                           select=_codes(select, "--select"), ignore=_codes(ignore, "--ignore"),
                           fail_on=fail_on, config=config)
    try:
        text, code = run_cli_check(options)
        if output is not None:
            write_atomic(output, text)
        else:
            click.echo(text, nl=False)
    except TrainlintError as exc:
        _fail(exc)
    sys.exit(code)


@main.command("rules")
def list_rules() -> None:
    """List every rule: code, name, severity, concern and summary."""
    from .engine import iter_rules

    rows = [[r.code, r.name, r.severity, r.concern, r.summary] for r in iter_rules()]
    click.echo(tabulate(rows, headers=["code", "name", "severity", "concern", "summary"],
                        tablefmt="simple", maxcolwidths=[None, None, None, None, 52]))


@main.command("rule")
@click.argument("code")
def show_rule(code: str) -> None:
    """Print one rule's documentation (by code or name)."""
    from .engine import load_rules, resolve_codes

    try:
        codes = resolve_codes([code])
    except TrainlintError as exc:
        _fail(exc)
    if len(codes) != 1:
        _fail(TrainlintError(f"{code!r} names {len(codes)} rules; give one code or name"))
    r = load_rules()[codes.pop()]
    thresholds = ", ".join(f"{k} = {v}" for k, v in r.defaults.items()) or "none"
    click.echo(f"{r.code} {r.name} ({r.severity})\n\n{r.doc}\n\n## Thresholds\n{thresholds}\n"
               f"(override in pyproject.toml: [tool.trainlint.rules.{r.code}])")
