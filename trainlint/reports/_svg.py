"""Draw a ``_panels.Panel`` as an inline SVG string (no scripts, no external references)."""

from __future__ import annotations

import math
from html import escape
from typing import Optional

from ._panels import Panel

WIDTH, HEIGHT = 560, 320
LEFT, RIGHT, TOP = 64, 16, 34
MAX_XLABELS = 36
XLABEL_CHARS = 14  # longer layer names keep their last characters
LEGEND_ROW = 15
CHAR_WIDTH = 5.6  # rough width of one 10px sans-serif character
AXIS = "#444"
GRID = "#e4e4e4"


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if 1e-2 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.0e}"


def tick_labels(ticks: list[float], log: bool) -> list[str]:
    """Tick texts with just enough decimals to tell neighbouring ticks apart."""
    if log or len(ticks) < 2:
        return [_fmt(t) for t in ticks]
    step = ticks[1] - ticks[0]
    biggest = max(abs(t) for t in ticks)
    if biggest >= 1e4 or biggest < 1e-3:
        digits = math.floor(math.log10(biggest)) - math.floor(math.log10(step) + 1e-9) + 1
        return [f"{t:.{min(max(digits, 1), 15)}g}" for t in ticks]
    decimals = min(8, max(0, -math.floor(math.log10(step) + 1e-9)))
    return [f"{t:.{decimals}f}" for t in ticks]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [i * step + 0.0 for i in range(first, last + 1)]


class Scale:
    """Data value -> pixel along one axis (linear or log10)."""

    def __init__(self, lo: float, hi: float, start: float, end: float, log: bool = False):
        self.log = log
        self.lo, self.hi = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
        self.start, self.end = start, end

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        t = (v - self.lo) / (self.hi - self.lo) if self.hi != self.lo else 0.5
        return self.start + t * (self.end - self.start)

    def clamp(self, value: float) -> float:
        lo, hi = sorted((self.start, self.end))
        return min(max(self(value), lo), hi)

    def ticks(self) -> list[float]:
        if not self.log:
            return nice_ticks(self.lo, self.hi)
        decades = range(math.ceil(self.lo - 1e-9), math.floor(self.hi + 1e-9) + 1)
        stride = max(1, math.ceil(len(decades) / 6))
        return [10.0 ** d for d in decades[::stride]]


def _y_range(panel: Panel) -> tuple[float, float]:
    if panel.ylim is not None:
        return panel.ylim
    values = [y for s in panel.series for y in s.ys if y is not None]
    values += [v for b in panel.boxes for v in (b.low, b.high)]
    if panel.log:
        values = [v for v in values if v > 0]
        if not values:
            return 1e-3, 1.0
        lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
        return 10.0 ** lo, 10.0 ** (hi if hi > lo else lo + 1)
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 1.0, hi + 1.0
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


class _Canvas:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, tag: str, text: Optional[str] = None, **attrs: object) -> None:
        rendered = " ".join(f'{k.rstrip("_").replace("_", "-")}="{escape(str(v))}"'
                            for k, v in attrs.items())
        if text is None:
            self.parts.append(f"<{tag} {rendered}/>")
        else:
            self.parts.append(f"<{tag} {rendered}>{escape(text)}</{tag}>")


def render_panel(panel: Panel, width: int = WIDTH, height: int = HEIGHT) -> str:
    """One panel as an ``<svg>`` element."""
    longest = min(max((len(x) for x in panel.xlabels), default=0), XLABEL_CHARS)
    bottom = 40 + round(4.3 * longest) if panel.xlabels else 44
    c = _Canvas()
    legend = _legend_rows(panel, width - LEFT - RIGHT)
    x0, x1, y0, y1 = LEFT, width - RIGHT, height - bottom, TOP + LEGEND_ROW * len(legend)
    lo, hi = _y_range(panel)
    ys = Scale(lo, hi, y0, y1, panel.log)
    if panel.xlabels:
        band = (x1 - x0) / max(len(panel.xs), 1)
        xs = Scale(-0.5, len(panel.xs) - 0.5, x0, x1)
    else:
        first, last = min(panel.xs), max(panel.xs)
        band = 0.0
        xs = Scale(first - 0.5, last + 0.5, x0, x1) if first == last else Scale(first, last,
                                                                                   x0, x1)
    c.add("text", panel.title, x=x0, y=18, font_size=14, font_weight="bold", fill="#222")
    _axes(c, panel, xs, ys, (x0, x1, y0, y1))
    for b in panel.boxes:
        _box(c, b, xs, ys, band)
    bars = [s for s in panel.series if s.style == "bar"]
    for k, s in enumerate(bars):
        _bars(c, s, panel.xs, xs, ys, band, k, len(bars))
    for s in panel.series:
        if s.style == "line":
            _line(c, s, panel.xs, xs, ys)
    _legend(c, legend, x0)
    body = "".join(c.parts)
    return (f'<svg class="panel" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{escape(panel.title)}" '
            f'font-family="sans-serif"><title>{escape(panel.title)}</title>{body}</svg>')


def _axes(c: _Canvas, panel: Panel, xs: Scale, ys: Scale, box: tuple) -> None:
    x0, x1, y0, y1 = box
    ticks = ys.ticks()
    for t, text in zip(ticks, tick_labels(ticks, ys.log)):
        y = ys(t)
        c.add("line", x1=x0, x2=x1, y1=y, y2=y, stroke=GRID)
        c.add("text", text, x=x0 - 6, y=y + 4, font_size=10, text_anchor="end", fill=AXIS)
    c.add("line", x1=x0, x2=x0, y1=y0, y2=y1, stroke=AXIS)
    c.add("line", x1=x0, x2=x1, y1=y0, y2=y0, stroke=AXIS)
    c.add("text", panel.ylabel, x=14, y=(y0 + y1) / 2, font_size=11, fill=AXIS,
          text_anchor="middle", transform=f"rotate(-90 14 {(y0 + y1) / 2})")
    if panel.xlabels:
        stride = max(1, math.ceil(len(panel.xlabels) / MAX_XLABELS))
        for i in range(0, len(panel.xlabels), stride):
            label = panel.xlabels[i]
            if len(label) > XLABEL_CHARS:
                label = "…" + label[1 - XLABEL_CHARS:]
            x = xs(i)
            c.add("text", label, x=x, y=y0 + 12, font_size=9, fill=AXIS, text_anchor="end",
                  transform=f"rotate(-45 {x} {y0 + 12})")
    else:
        for t in nice_ticks(xs.lo, xs.hi):
            if t != int(t):
                continue
            c.add("text", _fmt(t), x=xs(t), y=y0 + 16, font_size=10, fill=AXIS,
                  text_anchor="middle")
        c.add("text", panel.xlabel, x=(x0 + x1) / 2, y=y0 + 34, font_size=11, fill=AXIS,
              text_anchor="middle")


def _box(c: _Canvas, b, xs: Scale, ys: Scale, band: float) -> None:
    x = xs(b.x)
    half = max(band * 0.32, 1.5)
    tip = (f"{b.label}: mean {b.mid:.4g}, std {b.q3 - b.mid:.4g}, "
           f"min {b.low:.4g}, max {b.high:.4g}")
    c.parts.append(f"<g><title>{escape(tip)}</title>")
    c.add("line", x1=x, x2=x, y1=ys.clamp(b.low), y2=ys.clamp(b.high), stroke=b.color)
    top, bot = ys.clamp(b.q3), ys.clamp(b.q1)
    c.add("rect", x=x - half, y=top, width=2 * half, height=max(bot - top, 1.0), fill=b.color,
          fill_opacity=0.55, stroke=b.color)
    c.add("line", x1=x - half, x2=x + half, y1=ys.clamp(b.mid), y2=ys.clamp(b.mid),
          stroke="#222", stroke_width=1.5)
    c.parts.append("</g>")


def _bars(c: _Canvas, s, positions: list, xs: Scale, ys: Scale, band: float, k: int,
          count: int) -> None:
    width = band * 0.8 / count
    base = ys.clamp(0.0)
    for i, (pos, value) in enumerate(zip(positions, s.ys)):
        if value is None:
            continue
        left = xs(i if band else pos) - band * 0.4 + k * width
        top = ys.clamp(value)
        c.parts.append(f"<g><title>{escape(f'{s.name}: {value:.1f}')}</title>")
        c.add("rect", x=left, y=min(top, base), width=max(width - 1, 1.0),
              height=max(abs(base - top), 0.5), fill=s.color)
        c.parts.append("</g>")


def _line(c: _Canvas, s, positions: list, xs: Scale, ys: Scale) -> None:
    runs: list[list] = [[]]
    for pos, value in zip(positions, s.ys):
        if value is None:
            runs.append([])
            continue
        runs[-1].append((xs(pos), ys.clamp(value), value))
    for run in runs:
        if len(run) > 1:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in run)
            c.add("polyline", points=points, fill="none", stroke=s.color, stroke_width=1.8)
        for x, y, value in run:
            c.parts.append(f"<g><title>{escape(f'{s.name}: {value:.4g}')}</title>")
            c.add("circle", cx=f"{x:.1f}", cy=f"{y:.1f}", r=2.6, fill=s.color)
            c.parts.append("</g>")


def _legend_rows(panel: Panel, room: float) -> list[list]:
    """Legend entries (label, colour, x offset) wrapped into rows under the title."""
    named = [s for s in panel.series if s.name]
    if len(named) < 2 and not any(s.style == "bar" for s in named):
        return []
    rows: list[list] = [[]]
    offset = 0.0
    for s in named:
        label = s.name if len(s.name) <= 24 else "…" + s.name[-23:]
        need = 16 + CHAR_WIDTH * len(label) + 14
        if rows[-1] and offset + need > room:
            rows.append([])
            offset = 0.0
        rows[-1].append((label, s.color, offset))
        offset += need
    return rows


def _legend(c: _Canvas, rows: list[list], left: float) -> None:
    for r, row in enumerate(rows):
        y = TOP + LEGEND_ROW * r - 4
        for label, color, offset in row:
            c.add("rect", x=left + offset, y=y - 9, width=10, height=10, fill=color)
            c.add("text", label, x=left + offset + 14, y=y, font_size=10, fill=AXIS)
