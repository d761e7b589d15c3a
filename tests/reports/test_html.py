"""The HTML report: self-contained, escaped, and rendered for real in headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from trainlint.report import Report
from trainlint.reports import html
from trainlint.reports._panels import panels

from .conftest import dead_relu

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--hide-scrollbars"]
HEADER_RGB = (0x1F, 0x29, 0x37)
DEAD_BAR_RGB = (0x4C, 0x78, 0xA8)


class Elements(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))


def _elements(text: str) -> list[tuple[str, dict]]:
    parser = Elements()
    parser.feed(text)
    return parser.tags


def test_page_is_self_contained(hand_report: Report) -> None:
    tags = _elements(html.render(hand_report))
    names = {t for t, _ in tags}
    assert not names & {"script", "link", "img", "iframe", "object", "embed"}
    assert not any(k in ("src", "href") for _, attrs in tags for k in attrs)
    csp = [a["content"] for t, a in tags if a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]


def test_findings_fixes_and_plots_are_on_the_page(hand_report: Report) -> None:
    text = html.render(hand_report)
    tags = _elements(text)
    rows = [a for t, a in tags if t == "tr" and "finding" in a.get("class", "")]
    assert len(rows) == len(hand_report.findings)
    for f in hand_report.findings:
        assert escape(f.message) in text and escape(f.fix) in text
    assert "<b>&amp;</b>" not in text  # the message's markup is shown, not interpreted
    figures = [a["id"] for t, a in tags if t == "figure"]
    assert figures == [f"plot-{p.key}" for p in panels(hand_report)]
    assert sum(t == "svg" for t, _ in tags) == len(figures)
    assert escape(hand_report.suppressed[0].reason) in text
    assert {"loss", "steps-activations", "steps-gradients"} <= {p.key for p in
                                                               panels(hand_report)}


def _chromium() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("headless Chromium is needed for this test: apt-get install chromium "
                "(.ci/run installs it)")


def _browse(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
               *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True,
                          env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})


def test_renders_in_headless_chromium(real_report: Report, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(html.render(real_report), encoding="utf-8")
    shot = tmp_path / "shot.png"
    _browse(page, tmp_path, "--window-size=1280,1700", f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1700)
    colors = dict((rgb, n) for n, rgb in image.getcolors(maxcolors=1 << 22))
    assert len(colors) > 50, "the page looks blank"
    assert colors.get(HEADER_RGB, 0) > 1280 * 40  # the header band was painted
    assert colors.get(DEAD_BAR_RGB, 0) > 500  # the dead-units bar of the SVG plot was drawn

    dom = _browse(page, tmp_path, "--dump-dom").stdout
    assert 'id="findings-table"' in dom
    f = dead_relu(real_report)
    assert escape(f.message, quote=False) in dom and f.code in dom
    assert dom.count("<svg") == len(panels(real_report))
