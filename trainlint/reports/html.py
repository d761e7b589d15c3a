"""One self-contained HTML page: findings with fixes, inline SVG plots, the layer profile.

No script, no external reference (a Content-Security-Policy forbids loading anything), so
the file opens the same from a CI artifact, an e-mail or an air-gapped machine.
"""

from __future__ import annotations

from html import escape

from .. import __version__
from ..report import Report
from ._common import num, pct, summary_line, verdict, where_text
from ._panels import panels
from ._svg import render_panel
from .layers import layer_rows

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;
background:#f6f7f9}
header{background:#1f2937;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:20px}
header .meta{color:#cbd5e1;font-size:13px}
main{padding:8px 28px 28px;max-width:1280px}
h2{font-size:17px;margin:22px 0 8px}
.verdict{display:inline-block;margin-top:8px;padding:3px 10px;border-radius:12px;font-weight:600}
.verdict.fail{background:#dc2626}.verdict.pass{background:#16a34a}
table{border-collapse:collapse;background:#fff;width:100%;font-size:13px}
th,td{border:1px solid #e5e7eb;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f1f5f9}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f1f5f9;padding:0 3px;
border-radius:3px}
.sev{font-weight:600;white-space:nowrap;padding:2px 8px;border-radius:10px;color:#fff}
.sev.error{background:#dc2626}.sev.warning{background:#ea580c}.sev.info{background:#2563eb}
tr.baselined{opacity:.6}
.fix{color:#065f46}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:8px}
figure svg{width:100%;height:auto}
figcaption{font-size:12px;color:#555}
ul.notes{color:#444}
footer{color:#777;font-size:12px;margin-top:24px}
"""


def _findings(report: Report) -> str:
    if not report.findings:
        return '<p id="findings-table" class="clean">No findings.</p>'
    rows = []
    for f in report.findings:
        baselined = report.is_baselined(f)
        location = where_text(report, f)
        rows.append(
            f'<tr class="finding {f.severity}{" baselined" if baselined else ""}">'
            f'<td><span class="sev {f.severity}">{f.severity}</span>'
            f'{" <em>baselined</em>" if baselined else ""}</td>'
            f"<td><b>{escape(f.code)}</b><br>{escape(f.rule)}</td>"
            f"<td><code>{escape(f.module or '(model)')}</code></td>"
            f"<td>{f'<code>{escape(location)}</code>' if location else '-'}</td>"
            f'<td>{escape(f.message)}<div class="fix"><b>Fix:</b> {escape(f.fix)}</div></td>'
            "</tr>")
    return ('<table id="findings-table"><thead><tr><th>severity</th><th>rule</th>'
            "<th>module</th><th>location</th><th>finding and fix</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _suppressed(report: Report) -> str:
    if not report.suppressed:
        return ""
    rows = "".join(
        f"<tr><td>{escape(s.finding.code)} {escape(s.finding.rule)}</td>"
        f"<td><code>{escape(s.finding.module or '(model)')}</code></td>"
        f"<td>{escape(s.reason)}</td><td>{escape(s.finding.message)}</td></tr>"
        for s in report.suppressed)
    return (f'<section id="suppressed"><h2>Suppressed ({len(report.suppressed)})</h2>'
            "<table><thead><tr><th>rule</th><th>module</th><th>suppressed by</th>"
            f"<th>finding</th></tr></thead><tbody>{rows}</tbody></table></section>")


def _plots(report: Report) -> str:
    figures = "".join(
        f'<figure id="plot-{p.key}">{render_panel(p)}'
        f"{f'<figcaption>{escape(p.caption)}</figcaption>' if p.caption else ''}</figure>"
        for p in panels(report))
    if not figures:
        return ""
    return f'<section id="plots"><h2>Plots</h2><div class="plots">{figures}</div></section>'


def _layers(report: Report) -> str:
    rows = layer_rows(report.trace)
    if not rows:
        return ""
    body = []
    for r in rows:
        act = r["activation"] or {}
        grad = r["gradient"] or {}
        cells = [num(act.get("mean")), num(act.get("std")), num(act.get("min")),
                 num(act.get("max")), pct(act.get("zero_fraction")), pct(act.get("dead_fraction")),
                 pct(act.get("saturated_fraction")), num(grad.get("norm"))]
        body.append(f"<tr><td><code>{escape(r['label'])}</code></td><td>{escape(r['type'])}</td>"
                    + "".join(f'<td class="num">{escape(c)}</td>' for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in (
        "layer", "type", "mean", "std", "min", "max", "zeros", "dead", "saturated", "grad norm"))
    return (f'<section id="layers"><h2>Per-layer profile</h2><table><thead><tr>{head}</tr>'
            f"</thead><tbody>{''.join(body)}</tbody></table></section>")


def render(report: Report, fail_on: str = "warning", **_options: object) -> str:
    trace = report.trace
    target = report.target or trace.model_type or "model"
    failed = bool(report.failing(fail_on))
    meta = (f"{trace.observed_steps} observed step(s) · batch {trace.batch_size or '-'} · "
            f"{trace.device} · {trace.mode}")
    notes = "".join(f"<li>{escape(n)}</li>" for n in report.notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>trainlint: {escape(target)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>trainlint: {escape(target)}</h1><div class=\"meta\">{escape(meta)}</div>"
        f'<div class="meta">{escape(summary_line(report))}</div>'
        f'<span class="verdict {"fail" if failed else "pass"}">'
        f"{escape(verdict(report, fail_on))}</span></header><main>"
        f'<section id="findings"><h2>Findings</h2>{_findings(report)}</section>'
        f"{_suppressed(report)}{_plots(report)}{_layers(report)}"
        + (f'<section id="notes"><h2>Notes</h2><ul class="notes">{notes}</ul></section>'
           if notes else "")
        + f"<footer>trainlint {escape(__version__)}</footer></main></body></html>\n")
