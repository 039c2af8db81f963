"""The leaderboard as one static, self-contained HTML page: inline CSS and JS, inline SVG charts, no network.

The page opens on the reproductions summary (every published cell: its verdict or why there is none). Then one
section per benchmark table: the columns a reader compares (ours, random init, the paper, Δ, verdict, vs best),
sortable by clicking a header (numbers as numbers, missing values last) and narrow enough for a 1400 px window;
the rest of each row (digest, times, device, ...) in a collapsed details table; a bar chart of ours vs the paper
per table, with 95% CI whiskers, and, when records carry validation curves, validation score against training
wall-clock. SVG sizes follow from their labels' lengths (at a generous per-character width), so no label is cut,
and every curve lies inside its axes. Deterministic: coordinates are printed with fixed precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from metabench.report.leaderboard import (
    BELOW,
    DETAILS_SUMMARY,
    METHODS_TEXT,
    OVERLAP,
    REPRODUCED,
    BenchmarkTable,
    Column,
    Row,
    detail_columns,
    main_columns,
    ours_text,
    published_text,
)
from metabench.report.reproductions import (
    SUMMARY_HEADINGS,
    Reproduction,
    counts_text,
    groups,
    notes,
    paper_heading,
)

OURS_COLOR, PAPER_COLOR = "#2b6cb0", "#dd6b20"
PALETTE = ("#2b6cb0", "#c53030", "#2f855a", "#6b46c1", "#b7791f", "#00838f", "#d53f8c", "#4a5568")
# Upper bound of one character's advance in the charts' 11 px text (DejaVu Sans digits are 0.64 em = 7.0 px; most
# letters less): an SVG is sized from its longest label at this width, so the browser never cuts one.
CHAR_PX = 7.2

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1a202c}
h1{font-size:24px}h2{font-size:18px;margin-top:36px;border-bottom:1px solid #cbd5e0}h3{font-size:15px}
table.lb,table.summary{border-collapse:collapse;margin:8px 0 12px;font-size:13px;max-width:100%}
table th,table td{border:1px solid #cbd5e0;padding:3px 7px;text-align:left;white-space:nowrap;vertical-align:top}
table td.wrap{white-space:normal;min-width:8em;max-width:22em}
table.lb th{background:#edf2f7;cursor:pointer;user-select:none;white-space:normal}
table.summary th{background:#edf2f7;white-space:normal}
table.summary tr.group th{background:#f7fafc;font-weight:600;white-space:normal;max-width:none}
table.lb th[aria-sort=ascending]::after{content:" \\25B2"}table.lb th[aria-sort=descending]::after{content:" \\25BC"}
table.lb tr.tied td{font-weight:700}table.lb tr.paper td{color:#4a5568;font-style:italic}
table.lb tr.other td{background:#fffaf0}
td.v-reproduced{color:#276749;font-weight:700}td.v-overlap{color:#975a16;font-weight:700}
td.v-below{color:#9b2c2c;font-weight:700}td.v-none{color:#4a5568}
.warn{color:#9c4221;font-weight:600}.methods,.notes{font-size:13px;color:#2d3748;max-width:1100px}
.counts{font-weight:600}details.more summary{cursor:pointer;color:#2d3748;font-size:13px}
.charts{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
svg text{font:11px system-ui,sans-serif;fill:#1a202c}code{font-size:12px}
"""

# Sorting: each cell carries data-v (a number, or text); empty data-v sorts last in both directions.
_JS = """
document.querySelectorAll('table.lb').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th, col){
    th.addEventListener('click', function(){
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var key = function(r){return r.cells[col].getAttribute('data-v');};
      rows.sort(function(a, b){
        var x = key(a), y = key(b);
        if (x === '' || y === '') return (x === '') - (y === '');
        var nx = Number(x), ny = Number(y), c;
        if (!isNaN(nx) && !isNaN(ny)) c = nx - ny; else c = x < y ? -1 : (x > y ? 1 : 0);
        return asc ? c : -c;
      });
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
"""


def _num(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6f}"


def sort_value(column: Column, row: Row) -> str:
    """A cell's data-v: its number where the column is numeric (empty when missing), else its text (empty for —)."""
    if column.number is not None:
        return _num(column.number(row))
    text = column.text(row)
    return "" if text == "—" else text


def _td(text: str, wrap: bool, attributes: str = "") -> str:
    css = ' class="wrap"' if wrap else ""
    return f"<td{attributes}{css}>{text}</td>"


def _cells_html(columns: Sequence[Column], row: Row) -> str:
    return "".join(_td(escape(c.text(row)), c.wrap, f' data-v="{escape(sort_value(c, row))}"') for c in columns)


def _table_html(columns: Sequence[Column], rows: Sequence[Row], css: str, table_id: str) -> list[str]:
    out = [f'<table class="lb" id="{escape(table_id)}"><thead><tr>']
    out += [f"<th>{escape(c.heading)}</th>" for c in columns]
    out.append("</tr></thead><tbody>")
    for row in rows:
        kind = "paper" if row.paper_only else css
        classes = kind + (" tied" if row.tied and css == "ref" else "")
        out.append(f'<tr class="{classes}">{_cells_html(columns, row)}</tr>')
    out.append("</tbody></table>")
    return out


def _tables_html(table: BenchmarkTable, rows: Sequence[Row], css: str, table_id: str) -> list[str]:
    """The table of compared columns, then the collapsed details table of the same rows."""
    return (_table_html(main_columns(table), rows, css, table_id)
            + [f'<details class="more"><summary>{escape(DETAILS_SUMMARY)}</summary>']
            + _table_html(detail_columns(table), rows, css, f"{table_id}-details") + ["</details>"])


# -- the reproductions summary ------------------------------------------------------------------------------

_STATE_CSS = {REPRODUCED: "v-reproduced", OVERLAP: "v-overlap", BELOW: "v-below"}


def summary_html(reproductions: Sequence[Reproduction]) -> list[str]:
    """The summary section: counts, one table (a row group per paper) and the notes."""
    out = ['<section id="reproductions"><h2>Reproductions</h2>',
           f'<p class="counts">{escape(counts_text(reproductions))}</p>',
           '<table class="summary" id="summary"><thead><tr>']
    out += [f"<th>{escape(h)}</th>" for h in SUMMARY_HEADINGS]
    out.append("</tr></thead>")
    wrap = {0, 3}  # table · row and test protocol: long text
    for paper, cells in groups(reproductions):
        out.append(f'<tbody><tr class="group"><th colspan="{len(SUMMARY_HEADINGS)}" scope="rowgroup">'
                   f"{escape(paper_heading(paper))}</th></tr>")
        for r in cells:
            texts = [escape(t) for t in r.cells()]
            if r.row is not None and r.anchor:
                texts[5] = f'<a href="#{escape(r.anchor)}">{texts[5]}</a>'
            tds = [_td(t, i in wrap) for i, t in enumerate(texts[:-1])]
            tds.append(f'<td class="{_STATE_CSS.get(r.state, "v-none")}">{texts[-1]}</td>')
            out.append(f'<tr class="cell">{"".join(tds)}</tr>')
        out.append("</tbody>")
    out.append("</table>")
    out.append('<ul class="notes">' + "".join(f"<li><i>{escape(term)}</i>: {escape(text)}</li>"
                                              for term, text in notes(reproductions)) + "</ul></section>")
    return out


# -- charts ---------------------------------------------------------------------------------------------------

def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    raw = (hi - lo) / count
    step = next(s * 10 ** math.floor(math.log10(raw)) for s in (1, 2, 2.5, 5, 10)
                if s * 10 ** math.floor(math.log10(raw)) >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _text_px(text: str) -> float:
    return CHAR_PX * len(text)


def bar_chart(table: BenchmarkTable, rows: Sequence[Row], name: str) -> str:
    """Bars per row: ours (blue) and the paper (orange), each with its 95% CI whisker and its value, in percent.
    Each row's label stands on its own line above its bars, so a long label widens the chart instead of being cut."""
    values: list[float] = []
    for r in rows:
        if not r.paper_only:
            ci = 0.0 if math.isnan(r.ci95) else 100 * r.ci95
            values += [100 * r.mean - ci, 100 * r.mean + ci]
        if r.paper:
            values += [r.paper.mean - (r.paper.ci95 or 0), r.paper.mean + (r.paper.ci95 or 0)]
    lo = max(0.0, math.floor((min(values) - 2) / 10) * 10)
    hi = min(100.0, max(lo + 10, math.ceil((max(values) + 1) / 10) * 10))
    labels = [f"{r.label}{' · ' + r.preset if r.preset else ''}" for r in rows]
    title = (f"{name}: {table.metric} % — ■ ours ■ paper (whiskers: 95% CI; axis from {lo:g}%)")
    pad, band, top, value_px = 8, 44, 24, _text_px("100.00 ± 10.00") + 8
    width = math.ceil(max(560.0, max(_text_px(t) for t in [title, *labels]) + 2 * pad))
    plot = width - 2 * pad - value_px  # the bars' axis; the values stand right of it
    height = top + band * len(rows) + 26

    def x(v: float) -> float:
        return pad + plot * (min(max(v, lo), hi) - lo) / (hi - lo)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="bars" width="{width}" height="{height}" '
           f'role="img" aria-label="{escape(table.title)}: {escape(name)}, ours vs paper">',
           f'<text x="{pad}" y="14">{escape(name)}: {escape(table.metric)} % — '
           f'<tspan fill="{OURS_COLOR}">■ ours</tspan> <tspan fill="{PAPER_COLOR}">■ paper</tspan> '
           f'(whiskers: 95% CI; axis from {lo:g}%)</text>']
    for t in _ticks(lo, hi):
        out.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{height - 22}" stroke="#e2e8f0"/>'
                   f'<text x="{x(t):.1f}" y="{height - 8}" text-anchor="middle">{t:g}</text>')
    for i, (r, label) in enumerate(zip(rows, labels)):
        y0 = top + i * band
        out.append(f'<text x="{pad}" y="{y0 + 12}">{escape(label)}</text>')
        bars = []  # (y, mean, CI, colour, the value as printed: ours to 2 decimals, the paper's as published)
        if not r.paper_only:
            ci = 0.0 if math.isnan(r.ci95) else 100 * r.ci95
            bars.append((y0 + 17, 100 * r.mean, ci, OURS_COLOR, ours_text(r)))
        if r.paper:
            bars.append((y0 + 30, r.paper.mean, r.paper.ci95 or 0.0, PAPER_COLOR, published_text(r.paper)))
        for y, mean, ci, color, text in bars:
            out.append(f'<rect x="{pad}" y="{y}" width="{x(mean) - pad:.1f}" height="10" fill="{color}" '
                       f'opacity="0.85"><title>{text}</title></rect>')
            if ci > 0:
                out.append(f'<path d="M{x(mean - ci):.1f} {y + 5}H{x(mean + ci):.1f}M{x(mean - ci):.1f} {y + 1}'
                           f'V{y + 9}M{x(mean + ci):.1f} {y + 1}V{y + 9}" stroke="#1a202c" fill="none"/>')
            out.append(f'<text x="{x(mean + ci) + 4:.1f}" y="{y + 9}">{escape(text)}</text>')
    out.append("</svg>")
    return "".join(out)


def curve_chart(table: BenchmarkTable) -> str:
    """Validation score (%) against training wall-clock seconds, one line per run; '' when no curves. The axes
    cover every point (so every line lies inside the plot box); the legend stands below the plot."""
    series = [(r, c) for r in table.rows + table.other_rows for c in r.curves if c]
    if not series:
        return ""
    xs = [p[1] for _, c in series for p in c]
    ys = [100 * p[2] for _, c in series for p in c]
    x_hi = max(max(xs), 1e-9)
    y_lo, y_hi = math.floor(min(ys) / 10) * 10, min(100.0, math.ceil(max(ys) / 10) * 10)
    if y_hi <= y_lo:
        y_hi = y_lo + 10
    rows: list[Row] = []
    for r, _ in series:
        if r not in rows:
            rows.append(r)
    names = [f"{r.label} · {r.preset}" + ("" if r.digest == table.reference_digest else " (≠ episodes)")
             for r in rows]
    title = f"validation {table.metric} % vs training wall-clock (s)"
    x_ticks = _ticks(0.0, x_hi)
    left, top, height = 50, 24, 220
    right_margin = _text_px(f"{x_ticks[-1]:g}") / 2 + 8  # the last tick's label is centred on its tick
    width = 460
    svg_width = math.ceil(max(left + width + right_margin, *(_text_px(t) + left for t in [title, *names]),
                              *(_text_px("■ " + n) + left + 4 for n in names)))
    svg_height = top + height + 34 + 16 * len(rows)

    def px(v: float) -> float:
        return left + width * v / x_hi

    def py(v: float) -> float:
        return top + height * (1 - (v - y_lo) / (y_hi - y_lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="curves" width="{svg_width}" '
           f'height="{svg_height}" role="img" aria-label="{escape(table.title)}: validation vs time">',
           f'<text x="{left}" y="14">{escape(title)}</text>',
           f'<rect class="plot" x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#a0aec0"/>']
    clip = f"clip-{table.anchor}"  # the lines' stroke width stays inside the plot box too
    out.append(f'<clipPath id="{escape(clip)}"><rect x="{left}" y="{top}" width="{width}" height="{height}"/>'
               f'</clipPath>')
    for t in _ticks(y_lo, y_hi):
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in x_ticks:
        out.append(f'<text x="{px(t):.1f}" y="{top + height + 16}" text-anchor="middle">{t:g}</text>')
    for r, c in series:
        color = PALETTE[rows.index(r) % len(PALETTE)]
        points = " ".join(f"{px(p[1]):.1f},{py(100 * p[2]):.1f}" for p in c)
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.6" '
                   f'clip-path="url(#{escape(clip)})"/>')
    for i, name in enumerate(names):
        color = PALETTE[i % len(PALETTE)]
        # The swatch is a tspan: the page's CSS colours svg text, which beats a fill attribute on <text>.
        out.append(f'<text x="{left}" y="{top + height + 36 + 16 * i}"><tspan fill="{color}">■</tspan> '
                   f'{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _methods_html() -> str:
    items = []
    for line in METHODS_TEXT.splitlines():
        text = escape(line.removeprefix("- "))
        while "**" in text:  # the Markdown bold/italic of METHODS_TEXT, as tags
            text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
        while text.count("*") >= 2:
            text = text.replace("*", "<i>", 1).replace("*", "</i>", 1)
        items.append(f"<li>{text}</li>")
    return '<ul class="methods">' + "".join(items) + "</ul>"


def render_html(tables: Sequence[BenchmarkTable], problems: Sequence[str] = (),
                reproductions: Sequence[Reproduction] = ()) -> str:
    """The whole ``leaderboard.html`` page as text."""
    out = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>metabench leaderboard</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>metabench leaderboard</h1>",
           "<p>Generated by <code>metabench leaderboard</code> from the run records; do not edit by hand. "
           "Click a column heading of a benchmark table to sort it.</p>"]
    if reproductions:
        out += summary_html(reproductions)
    out += ["<details><summary>How to read it</summary>", _methods_html(), "</details>"]
    if problems:
        out.append('<p class="warn">Skipped record files:</p><ul>')
        out += [f"<li>{escape(p)}</li>" for p in problems]
        out.append("</ul>")
    out.append('<nav><ul>' + "".join(f'<li><a href="#{escape(t.anchor)}">{escape(t.title)}</a></li>'
                                     for t in tables) + "</ul></nav>")
    for table in tables:
        out.append(f'<section id="{escape(table.anchor)}"><h2>{escape(table.title)}</h2>')
        charts = []
        if table.rows:
            out.append(f"<p>Test episodes: {table.rows[0].episodes}, digest <code>{escape(table.reference_digest)}"
                       f"</code>. Bold: best and not significantly worse (paired test).</p>")
            out += _tables_html(table, table.rows + table.paper_rows, "ref", f"t-{table.anchor}")
            charts.append(bar_chart(table, table.rows + table.paper_rows, "this table"))
        if table.other_rows:
            digests = ", ".join(f"<code>{escape(d[:12])}</code>" for d in sorted({r.digest for r in table.other_rows}))
            out.append(f'<p class="warn">Different test episodes — not comparable with the table above '
                       f"(digest {digests}); never ranked with it.</p>")
            out += _tables_html(table, table.other_rows, "other", f"o-{table.anchor}")
            charts.append(bar_chart(table, table.other_rows, "different test episodes"))
        out.append('<div class="charts">' + "".join(charts) + curve_chart(table) + "</div></section>")
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out) + "\n"
