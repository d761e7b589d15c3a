"""``report.plot()`` and ``--plot``: the same pictures as the HTML page, through matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from tests.conftest import run_cli
from trainlint.errors import TrainlintError
from trainlint.report import Report
from trainlint.reports._panels import panels


def test_plot_returns_one_axes_per_picture(hand_report: Report) -> None:
    fig = hand_report.plot()
    assert isinstance(fig, Figure)
    expected = panels(hand_report)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [p.title for p in expected]
    by_title = {ax.get_title(): ax for ax in axes}
    for p in expected:
        assert by_title[p.title].get_yscale() == ("log" if p.log else "linear")


def test_box_medians_are_the_layer_means(hand_report: Report) -> None:
    fig = hand_report.plot()
    ax = fig.get_axes()[0]
    layers = sorted(hand_report.trace.layers, key=lambda lt: lt.depth)
    medians = [line for line in ax.get_lines() if len(set(line.get_ydata())) == 1
               and len(line.get_ydata()) == 2 and line.get_color() == "#222"]
    assert [m.get_ydata()[0] for m in medians] == pytest.approx(
        [lt.activation.mean for lt in layers])


def test_plot_saves_png_and_svg(hand_report: Report, tmp_path: Path) -> None:
    png, svg = tmp_path / "p.png", tmp_path / "p.svg"
    hand_report.plot(str(png))
    hand_report.plot(str(svg))
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert b"<svg" in svg.read_bytes()[:2000]


def test_without_matplotlib_the_error_says_what_to_install(
        hand_report: Report, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(TrainlintError, match=r"trainlint\[plot\]"):
        hand_report.plot()


@pytest.mark.parametrize("name", ["plot.png", "plot.txt"])
def test_cli_plot_option(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    run = run_cli(["check", "fixtures/dead_relu.py", "--plot", out])
    if name.endswith(".png"):
        assert run.exit_code == 1  # the dead_relu finding, as without --plot
        assert out.read_bytes().startswith(b"\x89PNG")
    else:
        assert run.exit_code == 2 and ".png or .svg" in run.stderr
        assert not out.exists()


def test_cli_plot_without_matplotlib_says_so_before_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It ran the whole check, printed the report and only then exited 2."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    calls = []
    monkeypatch.setattr("trainlint.runner.run_check", lambda *a: calls.append(a))
    run = run_cli(["check", "fixtures/dead_relu.py", "--plot", tmp_path / "p.png"])
    assert run.exit_code == 2 and calls == [] and run.stdout == ""
    assert "--plot needs matplotlib: pip install 'trainlint[plot]'" in run.stderr
