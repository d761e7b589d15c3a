"""The pictures' data (checked against the trace directly) and their SVG drawing."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainlint.report import Report
from trainlint.reports import _svg
from trainlint.reports._panels import Box, Panel, Series, panels


def _by_key(report: Report) -> dict[str, Panel]:
    return {p.key: p for p in panels(report)}


def test_distribution_boxes_are_mean_std_min_max(hand_report: Report) -> None:
    panel = _by_key(hand_report)["activations"]
    layers = sorted(hand_report.trace.layers, key=lambda lt: lt.depth)
    assert panel.xlabels == [lt.module for lt in layers]
    assert len(panel.boxes) == len(layers)
    for box, lt in zip(panel.boxes, layers):
        a = lt.activation
        assert (box.low, box.mid, box.high) == (a.min, a.mean, a.max)
        assert box.q1 == pytest.approx(a.mean - a.std) and box.q3 == pytest.approx(a.mean + a.std)
    lo, hi = panel.ylim
    assert all(lo <= b.q1 and b.q3 <= hi for b in panel.boxes)


def test_dead_saturated_and_gradient_panels(hand_report: Report) -> None:
    by_key = _by_key(hand_report)
    layers = sorted(hand_report.trace.layers, key=lambda lt: lt.depth)
    dead, sat = by_key["activity"].series
    for i, lt in enumerate(layers):
        expect_dead = None if lt.unit_ever_active is None else \
            100 * (1 - lt.unit_ever_active.sum() / lt.unit_ever_active.size)
        assert dead.ys[i] == (None if expect_dead is None else pytest.approx(expect_dead))
        expect_sat = lt.activation.saturated_fraction if lt.kind == "tanh" else None
        assert sat.ys[i] == (None if expect_sat is None else pytest.approx(100 * expect_sat))
    grads = by_key["gradients"]
    assert grads.log and grads.series[0].ys == [lt.grad_norm for lt in layers]


def test_monitor_panels_follow_the_observed_steps(hand_report: Report) -> None:
    by_key = _by_key(hand_report)
    steps = [s["step"] for s in hand_report.trace.per_step]
    assert by_key["loss"].xs == steps and by_key["loss"].series[0].ys == hand_report.trace.losses
    over = by_key["steps-activations"]
    assert over.xs == steps
    named = {s.name: s.ys for s in over.series}
    assert named["enc.1"] == [s["layers"][("enc.1", "output", None)]["std"]
                              for s in hand_report.trace.per_step]
    assert by_key["steps-gradients"].series[0].ys == [s["grad_norm"]
                                                      for s in hand_report.trace.per_step]


def test_one_observed_step_draws_no_curves(hand_report: Report) -> None:
    hand_report.trace.per_step = hand_report.trace.per_step[:1]
    assert not {"loss", "steps-activations", "steps-gradients"} & set(_by_key(hand_report))


def test_svg_is_well_formed_and_escaped(hand_report: Report) -> None:
    for panel in panels(hand_report):
        panel.title += " <&>"
        root = ET.fromstring(_svg.render_panel(panel))
        assert root.tag == "svg" and root.find("title").text == panel.title


def test_box_geometry_matches_the_scale() -> None:
    panel = Panel(key="k", title="t", ylabel="y", xlabel="x", xs=[0, 1], xlabels=["a", "b"],
                  ylim=(-2.0, 2.0), boxes=[])
    panel.boxes = [Box(x=0, low=-1.5, q1=-1.0, mid=0.0, q3=1.0, high=1.5, color="#123456")]
    root = ET.fromstring(_svg.render_panel(panel, width=400, height=300))
    rect = next(r for r in root.iter("rect") if r.get("fill") == "#123456")
    top, height = float(rect.get("y")), float(rect.get("height"))
    # the box spans mean +- std = [-1, 1]: exactly between the grid lines of ticks 1 and -1
    children = list(root)  # each y grid line is followed by its tick label
    grid = {text.text: float(line.get("y1")) for line, text in zip(children, children[1:])
            if line.tag == "line" and text.tag == "text" and text.get("text-anchor") == "end"}
    assert top == pytest.approx(grid["1"]) and top + height == pytest.approx(grid["-1"])
    assert grid["0"] - grid["1"] == pytest.approx(grid["-1"] - grid["0"])


def test_lines_break_at_missing_values() -> None:
    panel = Panel(key="k", title="t", ylabel="y", xlabel="step", xs=[0, 1, 2, 3, 4],
                  series=[Series("s", [1.0, 2.0, None, 3.0, 4.0], "line", "#abcdef")], log=True)
    root = ET.fromstring(_svg.render_panel(panel))
    assert len([p for p in root.iter("polyline")]) == 2
    assert len([c for c in root.iter("circle")]) == 4


@given(st.floats(-1e6, 1e6), st.floats(1e-6, 1e6))
def test_nice_ticks_cover_the_range_with_round_steps(lo: float, span: float) -> None:
    span = max(span, 1e-6 * abs(lo))  # narrower ranges are below float resolution at lo
    hi = lo + span
    ticks = _svg.nice_ticks(lo, hi)
    assert 2 <= len(ticks) <= 11
    assert all(lo - 1e-9 * span <= t <= hi + 1e-9 * span for t in ticks)
    steps = [b - a for a, b in zip(ticks, ticks[1:])]
    step = steps[0]
    assert all(s == pytest.approx(step, rel=1e-6) for s in steps)
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6
    labels = _svg.tick_labels(ticks, log=False)
    assert len(set(labels)) == len(labels)
