"""Markdown: a findings table whose cells survive any message, and the per-layer profile."""

from __future__ import annotations

import dataclasses
import re

from trainlint.report import Report
from trainlint.reports import markdown
from trainlint.reports.layers import layer_rows

UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def _cells(row: str) -> list[str]:
    assert row.startswith("| ") and row.endswith(" |")
    return [c.strip() for c in UNESCAPED_PIPE.split(row[1:-1])]


def _table(text: str, header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    return rows


def test_findings_table_has_one_row_per_finding(hand_report: Report) -> None:
    text = markdown.render(hand_report)
    header = "| severity | code | rule | module | location | message | fix |"
    rows = _table(text, header)
    assert len(rows) == len(hand_report.findings)
    for cells, f in zip(rows, hand_report.findings):
        assert len(cells) == 7
        assert cells[0].endswith(f.severity) and cells[1] == f.code and cells[2] == f.rule
        assert "\n" not in cells[5] and "<br>" in cells[6]  # the fix spans two lines
    assert rows[0][4] == "`fixtures/dead_relu.py:12`"
    assert rows[2][3] == "`(model)`" and rows[2][4] == f"`{hand_report.target}`"


def test_profile_table_lists_every_layer(hand_report: Report) -> None:
    text = markdown.render(hand_report)
    rows = _table(text, "| layer | type | act mean | act std | min | max | dead | saturated "
                        "| grad norm |")
    expected = layer_rows(hand_report.trace)
    assert [r[0] for r in rows] == [f"`{e['label']}`" for e in expected]
    dead = next(r for r, e in zip(rows, expected) if e["activation"]["dead_fraction"])
    assert dead[6] == "75%"  # 3 of the 4 units of enc.1 never fired


def test_summary_suppressed_and_notes(hand_report: Report) -> None:
    text = markdown.render(hand_report, fail_on="error")
    assert "1 suppressed" in text and "failed: 1 finding(s) at or above error" in text
    assert "1 suppressed finding(s)" in text and hand_report.suppressed[0].finding.message in text
    assert f"- {hand_report.notes[0]}" in text


def test_clean_report_says_so(hand_report: Report) -> None:
    hand_report.findings = []
    text = markdown.render(hand_report)
    assert "No findings." in text and "passed" in text


def test_messages_cannot_inject_html(hand_report: Report) -> None:
    row = _table(markdown.render(hand_report),
                 "| severity | code | rule | module | location | message | fix |")[0]
    assert "<b>" not in row[5] and "&lt;b&gt;&amp;amp;&lt;/b&gt;" in row[5]
    assert "50% \\| " in markdown.render(hand_report)


def test_a_line_break_in_a_module_name_keeps_the_row_on_one_line(hand_report: Report) -> None:
    first = hand_report.findings[0]
    hand_report.findings[0] = dataclasses.replace(first, module="blocks\r\nenc|0")
    text = markdown.render(hand_report)
    rows = _table(text, "| severity | code | rule | module | location | message | fix |")
    assert len(rows) == len(hand_report.findings)
    assert rows[0][3] == "`blocks\\r\\nenc\\|0`"
