"""The HTML report's pictures as a matplotlib Figure (``report.plot()``, ``--plot FILE``).

Needs the optional extra ``trainlint[plot]``. Uses ``matplotlib.figure.Figure`` directly (no
pyplot): nothing global changes, and it works on headless machines.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Union

from ..errors import TrainlintError
from ..report import Report
from ..tempfiles import temp_beside
from ._panels import Panel, panels

MAX_XLABELS = 36


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise TrainlintError("plots need matplotlib: pip install 'trainlint[plot]'") from None
    return Figure


def _nan(values: list) -> list:
    return [math.nan if v is None else v for v in values]


def _draw(ax: Any, panel: Panel) -> None:
    from matplotlib.ticker import MaxNLocator

    if panel.boxes:
        stats = [{"med": b.mid, "q1": b.q1, "q3": b.q3, "whislo": b.low, "whishi": b.high,
                  "label": b.label} for b in panel.boxes]
        artists = ax.bxp(stats, positions=[b.x for b in panel.boxes], showfliers=False,
                         patch_artist=True, widths=0.6, medianprops={"color": "#222"})
        for patch, b in zip(artists["boxes"], panel.boxes):
            patch.set_facecolor(b.color)
            patch.set_alpha(0.6)
    bars = [s for s in panel.series if s.style == "bar"]
    width = 0.8 / max(len(bars), 1)
    for k, s in enumerate(bars):
        offsets = [x - 0.4 + (k + 0.5) * width for x in panel.xs]
        ax.bar(offsets, _nan(s.ys), width=width, color=s.color, label=s.name)
    for s in panel.series:
        if s.style == "line":
            ax.plot(panel.xs, _nan(s.ys), marker="o", markersize=3, color=s.color, label=s.name)
    if panel.log:
        ax.set_yscale("log")
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    if panel.xlabels:
        stride = max(1, math.ceil(len(panel.xlabels) / MAX_XLABELS))
        ticks = list(range(0, len(panel.xlabels), stride))
        ax.set_xticks(ticks, [panel.xlabels[i] for i in ticks], rotation=45, ha="right",
                      fontsize=7)
        ax.set_xlim(-0.5, len(panel.xlabels) - 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(panel.title, fontsize=11)
    ax.set_ylabel(panel.ylabel)
    ax.set_xlabel(panel.xlabel)
    ax.grid(axis="y", color="#e4e4e4")
    if len(panel.series) > 1 or bars:
        ax.legend(fontsize=8)


def figure(report: Report, columns: int = 2, panel_size: tuple = (6.0, 3.6)) -> Any:
    """A Figure with one axes per picture of the report (``columns`` per row)."""
    Figure = _matplotlib()
    pictures = panels(report)
    rows = max(1, math.ceil(len(pictures) / columns))
    fig = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout="constrained")
    fig.suptitle(f"trainlint: {report.target or report.trace.model_type or 'model'}")
    if not pictures:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "nothing observed to plot", ha="center", va="center")
        return fig
    for i, panel in enumerate(pictures):
        _draw(fig.add_subplot(rows, columns, i + 1), panel)
    return fig


def save(fig: Any, path: Union[str, Path]) -> None:
    """Save ``fig`` (format from the suffix) through a temp file and a rename."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    fd, tmp = temp_beside(path)
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format=fmt)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise TrainlintError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
