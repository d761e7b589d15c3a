"""``--output FILE`` is written atomically (a temp file in the same folder, then a rename): an
existing file is replaced only when the run succeeds, and nothing half-written is ever seen."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

import trainlint.cli
import trainlint.runner
from tests.conftest import ROOT, run_cli
from trainlint.cli import new_file_mode, write_atomic
from trainlint.errors import TrainlintError

BAD = ROOT / "tests" / "bad_inputs"
OLD = "the previous report\n"


def check(out: Path, target: str = "fixtures/dead_relu.py", *extra: Any):
    return run_cli(["check", target, "--format", "json", "--output", out, *extra])


def fingerprint(path: Path) -> tuple:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns, st.st_mode


def existing(tmp_path: Path) -> Path:
    out = tmp_path / "report.json"
    out.write_text(OLD)
    os.utime(out, ns=(1_000_000_000, 1_000_000_000))
    return out


def test_output_holds_the_report_and_nothing_else_is_left(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    run = check(out)
    assert run.exit_code == 1, "dead_relu has a warning: a run with findings still writes"
    assert run.stdout == ""
    assert json.loads(out.read_text()) == run_cli(
        ["check", "fixtures/dead_relu.py", "--format", "json"]).doc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"], "no temp file left"


def test_new_file_gets_the_mode_open_would_give(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    check(out, "fixtures/healthy_relu.py")
    assert out.stat().st_mode & 0o777 == new_file_mode() & 0o777


def test_existing_file_is_replaced_on_success_and_keeps_its_mode(tmp_path: Path) -> None:
    out = existing(tmp_path)
    out.chmod(0o640)
    run = check(out, "fixtures/healthy_relu.py")
    assert run.exit_code == 0
    assert json.loads(out.read_text())["version"] == 1
    assert out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.parametrize("target,extra", [
    (str(BAD / "wrong_shape.py"), ()),       # the user's model raised
    (str(BAD / "missing.py"), ()),           # no target file
    ("fixtures/dead_relu.py", ("--steps", "0")),  # a bad option
    ("fixtures/dead_relu.py", ("--select", "TL999")),
])
def test_failed_run_leaves_the_existing_file_untouched(tmp_path: Path, target: str,
                                                       extra: tuple) -> None:
    out = existing(tmp_path)
    before = fingerprint(out)
    run = check(out, target, *extra)
    assert run.exit_code == 2 and run.stderr.startswith("trainlint: error: ")
    assert fingerprint(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_internal_error_while_rendering_leaves_the_file_untouched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> str:
        raise ValueError("renderer bug")

    monkeypatch.setattr(trainlint.runner, "render", broken)
    out = existing(tmp_path)
    before = fingerprint(out)
    run = check(out)
    assert run.exit_code == 2 and "internal error" in run.stderr
    assert fingerprint(out) == before


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = existing(tmp_path)
    before = fingerprint(out)
    monkeypatch.setattr(trainlint.cli.os, "replace", disk_full)
    run = check(out)
    assert run.exit_code == 2
    assert run.stderr.startswith(f"trainlint: error: cannot write {out}: "
                                 f"{os.strerror(errno.ENOSPC)}; the previous file, if any, is "
                                 "unchanged")
    assert fingerprint(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_an_interrupt_mid_write_keeps_the_old_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    out = existing(tmp_path)
    before = fingerprint(out)
    monkeypatch.setattr(trainlint.cli.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(out, "x" * 100_000)
    assert fingerprint(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_the_file_changes_only_by_one_rename_of_a_complete_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = existing(tmp_path)
    text = "new report\n" * 1000
    real_replace = os.replace
    calls: list = []

    def watching(src: str, dst: str) -> None:
        calls.append((Path(src), Path(dst)))
        assert out.read_text() == OLD, "the target is untouched until the rename"
        assert Path(src).read_text() == text, "the temp file is complete before the rename"
        real_replace(src, dst)

    monkeypatch.setattr(trainlint.cli.os, "replace", watching)
    write_atomic(out, text)
    [(src, dst)] = calls
    assert dst == out and src.parent == tmp_path, "temp file in the same folder (same fs)"
    assert out.read_text() == text


def test_missing_folder_is_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "report.json"
    run = check(out)
    assert run.exit_code == 2
    assert run.stderr.startswith(f"trainlint: error: cannot write {out}: folder "
                                 f"{out.parent} does not exist")
    assert not (tmp_path / "no").exists()
    with pytest.raises(TrainlintError, match="does not exist"):
        write_atomic(out, "text")


@pytest.mark.parametrize("option", ["--plot", "--write-baseline"])
def test_a_missing_folder_for_another_file_is_said_before_the_run(tmp_path: Path,
                                                                   option: str) -> None:
    """The report is not written (nor the check run) when a second file cannot be."""
    out, other = tmp_path / "report.json", tmp_path / "no" / "plots.png"
    run = check(out, "fixtures/dead_relu.py", option, other)
    assert run.exit_code == 2
    assert run.stderr.startswith(f"trainlint: error: cannot write {other}: folder "
                                 f"{other.parent} does not exist ({option})")
    assert not out.exists()


def test_output_that_is_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    run = check(tmp_path)
    assert run.exit_code == 2 and "is a directory" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_symbolic_link_stays_one_and_its_file_gets_the_report(tmp_path: Path) -> None:
    real = existing(tmp_path)
    link = tmp_path / "link.json"
    link.symlink_to(real.name)
    run = check(link)
    assert run.exit_code == 1, run.stderr
    assert link.is_symlink() and os.readlink(link) == real.name
    assert json.loads(real.read_text())["target"] == "fixtures/dead_relu.py"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "report.json"]


def test_a_fifo_is_written_in_place_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    try:
        write_atomic(fifo, "the report\n")
    finally:
        if reader.is_alive():  # unblock the reader if nothing was written
            with open(fifo, "w"):
                pass
        reader.join(10)
    assert received == ["the report\n"]
    assert stat.S_ISFIFO(fifo.stat().st_mode), "still a FIFO, not a regular file"
    assert list(tmp_path.iterdir()) == [fifo]
