"""The ``trainlint`` command line: parse, call the library, choose the exit code."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click
from tabulate import tabulate

from .errors import TrainlintError, UserCodeError
from .tempfiles import temp_beside
from .usercode import flat_message, raised_by_trainlint, user_traceback

if TYPE_CHECKING:
    from .report import Report

FORMAT_CHOICES = ["text", "json", "sarif", "junit", "github", "markdown", "html"]
PLOT_SUFFIXES = (".png", ".svg")


def _fail(exc: TrainlintError, fmt: Optional[str] = None) -> None:
    click.echo(f"trainlint: error: {exc}", err=True)
    if isinstance(exc, UserCodeError) and exc.user_traceback:
        click.echo(exc.user_traceback.rstrip(), err=True)
    _annotate_failure(fmt, f"trainlint could not run the check: {exc}")
    sys.exit(2)


def _annotate_failure(fmt: Optional[str], text: str) -> None:
    """With ``--format github``, a check that could not run is an error annotation too (the
    job's log shows it, not only its stderr)."""
    if fmt == "github":
        from .reports.github import escape_data, escape_property

        click.echo(f"::error title={escape_property('trainlint (exit 2)')}::{escape_data(text)}")


def _internal_error(exc: BaseException, fmt: Optional[str] = None) -> None:
    """A bug in trainlint itself: say so, keep the full traceback for the report, exit 2."""
    _annotate_failure(fmt, f"trainlint failed with an internal error: {type(exc).__name__}: "
                           f"{flat_message(exc)}")
    click.echo(f"trainlint: internal error: {type(exc).__name__}: {flat_message(exc)}. This is a "
               "bug in trainlint, not in your code; please report it with the traceback below.",
               err=True)
    click.echo("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip(),
               err=True)
    sys.exit(2)


def displayable(text: str) -> str:
    """``text`` as valid UTF-8: the bytes of a file name that is not UTF-8 (which Python holds
    as lone surrogates) become U+FFFD, so JSON, SARIF and JUnit stay well-formed."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file name's byte makes
        data = text.encode("utf-8", "replace")
    return data.decode("utf-8", "replace")


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file (mkstemp's own is 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: all or nothing.

    Readers see the old file or the complete new one, never a part; on any failure the old
    file is untouched and the temp file is removed. An existing file keeps its permissions; a
    symbolic link stays one (the file it points to is replaced); what is not a regular file
    (``/dev/null``, ``/dev/stdout``, a FIFO) is written in place, never replaced.
    """
    if path.exists() and not path.is_file():
        _write_in_place(path, text)
        return
    path = path.resolve()
    fd, tmp = temp_beside(path)
    try:
        mode = path.stat().st_mode & 0o7777 if path.is_file() else new_file_mode()
    except OSError as exc:
        os.close(fd)
        os.unlink(tmp)
        raise TrainlintError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.chmod(tmp, mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise TrainlintError(f"cannot write {path}: {exc.strerror or exc}; the previous "
                                 "file, if any, is unchanged") from None
        raise


def check_writable(path: Path, option: str) -> None:
    """Before the run: ``path`` can be written (its folder exists and takes a new file, or it
    is a device or pipe open for writing), so the run's report is not lost at the end."""
    if path.is_dir():  # (an empty name is the working directory)
        raise TrainlintError(f"cannot write {path} ({option}): it is a folder; give a file name")
    if path.exists() and not path.is_file():
        if not os.access(path, os.W_OK):
            raise TrainlintError(f"cannot write {path} ({option}): permission denied")
        return
    fd, probe = temp_beside(path, option)  # where a symbolic link's file is replaced
    os.close(fd)
    os.unlink(probe)


def _write_in_place(path: Path, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise TrainlintError(f"cannot write {path}: {exc.strerror or exc}") from None


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
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Findings listed in this baseline file do not fail the run.")
@click.option("--write-baseline", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write this run's findings to a baseline file (and treat them as baselined).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also save the report's plots to FILE.png or FILE.svg (needs matplotlib).")
def check(target: str, steps: Optional[int], batch_size: Optional[int],
          input_shape: Optional[str], device: Optional[str], seed: Optional[int], fmt: str,
          output: Optional[Path], select: tuple, ignore: tuple, fail_on: Optional[str],
          config: Optional[Path], baseline: Optional[Path], write_baseline: Optional[Path],
          plot: Optional[Path]) -> None:
    """Run a few training steps of TARGET (model.py or model.py:NAME) and lint them."""
    from .runner import CheckOptions, render, run_check

    # The user's code may change the working directory: paths are taken as given now.
    output, config, baseline, write_baseline, plot = (
        None if p is None else p.absolute()
        for p in (output, config, baseline, write_baseline, plot))
    options = CheckOptions(target=target, steps=steps, batch_size=batch_size,
                           input_shape=input_shape, device=device, seed=seed, fmt=fmt,
                           select=_codes(select, "--select"), ignore=_codes(ignore, "--ignore"),
                           fail_on=fail_on, config=config, baseline=baseline)
    try:
        if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
            raise TrainlintError(f"--plot {plot}: use a .png or .svg file name")
        if plot is not None and importlib.util.find_spec("matplotlib") is None:
            raise TrainlintError("--plot needs matplotlib: pip install 'trainlint[plot]'")
        for option, path in (("--output", output), ("--write-baseline", write_baseline),
                             ("--plot", plot)):
            if path is not None:  # say so before the run
                check_writable(path, option)
        # stdout carries the report only (JSON, SARIF, JUnit must parse): what the user's code
        # prints goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            report, fail_on = run_check(options)
        if write_baseline is not None:
            _write_baseline(report, write_baseline)
        text = displayable(render(report, fmt, fail_on=fail_on))
        if output is not None:
            try:
                write_atomic(output, text)
            except TrainlintError as exc:  # nothing lost: the report goes to stdout instead
                click.echo(text, nl=False)
                raise TrainlintError(f"{exc}; the report was written to stdout instead") \
                    from None
        else:
            click.echo(text, nl=False)
        if plot is not None:
            report.plot(str(plot))
        if fmt == "github":
            _step_summary(displayable(render(report, "markdown", fail_on=fail_on)))
    except TrainlintError as exc:
        _fail(exc, fmt)
    except SystemExit as exc:  # the user's code called sys.exit() (or exit()) during the check
        _fail(UserCodeError(f"the model's code called sys.exit({exc.code!r}) during the check; "
                            "code that ends the process must sit under `if __name__ == "
                            "\"__main__\":`", user_traceback(exc)), fmt)
    except KeyboardInterrupt:  # exit 2 (could not run), not click's "Aborted!" and 1 (findings)
        _fail(TrainlintError("interrupted (KeyboardInterrupt): the check did not finish"), fmt)
    except Exception as exc:
        _internal_error(exc, fmt)
    except BaseException as exc:  # GeneratorExit, CancelledError, a user's own BaseException
        if raised_by_trainlint(exc):
            _internal_error(exc, fmt)
        _fail(UserCodeError(f"the model's code raised {type(exc).__name__} during the check: "
                            f"{flat_message(exc)}", user_traceback(exc)), fmt)
    sys.exit(report.exit_code(fail_on))


def _write_baseline(report: Report, path: Path) -> None:
    """Save the findings as the new baseline; the run then counts them as baselined."""
    from . import baseline

    write_atomic(path, baseline.dumps(report))
    baseline.apply(report, frozenset(baseline.finding_key(f) for f in report.findings))


def _step_summary(markdown: str) -> None:
    """Append to the GitHub Actions job summary when running there."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(markdown)
    except OSError as exc:  # the job summary is an extra: the findings decide the exit status
        click.echo(f"trainlint: warning: cannot append to $GITHUB_STEP_SUMMARY ({path}): "
                   f"{exc.strerror or exc}; the annotations above hold the findings", err=True)


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
