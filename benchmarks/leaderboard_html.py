"""The leaderboard as one static, self-contained HTML page: inline CSS and JS, inline SVG charts, no network.

Per benchmark table: a table sortable by clicking any header (numbers sort as numbers, missing values
last), a bar chart of ours vs the paper with 95% CI whiskers, and, when records carry validation curves,
validation score against training wall-clock. Deterministic: coordinates are printed with fixed precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from metabench.leaderboard import METHODS_TEXT, BenchmarkTable, Row, cells, columns

OURS_COLOR, PAPER_COLOR = "#2b6cb0", "#dd6b20"
PALETTE = ("#2b6cb0", "#c53030", "#2f855a", "#6b46c1", "#b7791f", "#00838f", "#d53f8c", "#4a5568")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1a202c;max-width:1500px}
h1{font-size:24px}h2{font-size:18px;margin-top:36px;border-bottom:1px solid #cbd5e0}
table.lb{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
table.lb th,table.lb td{border:1px solid #cbd5e0;padding:3px 7px;text-align:left;white-space:nowrap}
table.lb th{background:#edf2f7;cursor:pointer;user-select:none}
table.lb th[aria-sort=ascending]::after{content:" \\25B2"}table.lb th[aria-sort=descending]::after{content:" \\25BC"}
table.lb tr.tied td{font-weight:700}table.lb tr.paper td{color:#4a5568;font-style:italic}
table.lb tr.other td{background:#fffaf0}
.warn{color:#9c4221;font-weight:600}.methods{font-size:13px;color:#2d3748;max-width:1100px}
.charts{display:flex;flex-wrap:wrap;gap:24px}svg text{font:11px system-ui,sans-serif;fill:#1a202c}
code{font-size:12px}.scroll{overflow-x:auto}
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


def _num(value: float | None, scale: float = 1.0) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{scale * value:.6f}"


def sort_values(table: BenchmarkTable, row: Row) -> list[str]:
    """The data-v of each cell, in :func:`columns` order: numbers where the column is numeric."""
    text = cells(table, row)
    ours = not row.paper_only
    paper = row.paper
    numeric = ([None, None, None, _num(row.mean, 100) if ours else ""]
               + [_num(row.metrics.get(m), 100) if ours else "" for m in table.extra_metrics]
               + [str(row.runs) if ours else "", str(row.episodes) if ours else "", None,
                  _num(paper.mean) if paper else "", None, _num(row.delta), None,
                  None if row.test or row.best else "",
                  _num(row.training_steps), _num(row.train_seconds), _num(row.eval_seconds),
                  _num(row.tasks_per_second), None])
    if row.best:
        numeric[-6] = "0"
    elif row.test is not None and row.test.p_value is not None:
        numeric[-6] = f"{1 - row.test.p_value:.6f}"  # ascending: best, then the most tied
    elif row.test is not None:
        numeric[-6] = "0.5" if row.test.tied else "1"
    return [("" if t == "—" else t) if v is None else v for t, v in zip(text, numeric)]


def _table_html(table: BenchmarkTable, rows: Sequence[Row], css: str, table_id: str) -> list[str]:
    out = [f'<div class="scroll"><table class="lb" id="{escape(table_id)}"><thead><tr>']
    out += [f"<th>{escape(h)}</th>" for h in columns(table)]
    out.append("</tr></thead><tbody>")
    for row in rows:
        kind = "paper" if row.paper_only else css
        classes = kind + (" tied" if row.tied and css == "ref" else "")
        tds = "".join(f'<td data-v="{escape(v)}">{escape(t)}</td>'
                      for t, v in zip(cells(table, row), sort_values(table, row)))
        out.append(f'<tr class="{classes}">{tds}</tr>')
    out.append("</tbody></table></div>")
    return out


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    raw = (hi - lo) / count
    step = next(s * 10 ** math.floor(math.log10(raw)) for s in (1, 2, 2.5, 5, 10)
                if s * 10 ** math.floor(math.log10(raw)) >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def bar_chart(table: BenchmarkTable) -> str:
    """Horizontal bars per row: ours (blue) and paper (orange), each with its 95% CI whisker, in percent."""
    rows = [r for r in table.rows + table.other_rows + table.paper_rows]
    values: list[float] = []
    for r in rows:
        if not r.paper_only:
            ci = 0.0 if math.isnan(r.ci95) else 100 * r.ci95
            values += [100 * r.mean - ci, 100 * r.mean + ci]
        if r.paper:
            values += [r.paper.mean - (r.paper.ci95 or 0), r.paper.mean + (r.paper.ci95 or 0)]
    lo = max(0.0, math.floor((min(values) - 2) / 10) * 10)
    hi = min(100.0, max(lo + 10, math.ceil((max(values) + 1) / 10) * 10))
    left, width, band, top = 190, 460, 30, 24
    height = top + band * len(rows) + 30

    def x(v: float) -> float:
        return left + width * (min(max(v, lo), hi) - lo) / (hi - lo)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="bars" width="{left + width + 70}" height="{height}" '
           f'role="img" aria-label="{escape(table.title)}: ours vs paper">',
           f'<text x="{left}" y="14">{escape(table.metric)} % — '
           f'<tspan fill="{OURS_COLOR}">■ ours</tspan> <tspan fill="{PAPER_COLOR}">■ paper</tspan> '
           f'(whiskers: 95% CI; axis from {lo:g}%)</text>']
    for t in _ticks(lo, hi):
        out.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{height - 24}" stroke="#e2e8f0"/>'
                   f'<text x="{x(t):.1f}" y="{height - 10}" text-anchor="middle">{t:g}</text>')
    for i, r in enumerate(rows):
        y0 = top + i * band
        note = "" if r.paper_only or r.digest == table.reference_digest else " ≠ episodes"
        out.append(f'<text x="{left - 6}" y="{y0 + 18}" text-anchor="end">{escape(r.label)}'
                   f'{escape(" · " + r.preset if r.preset else "")}{escape(note)}</text>')
        bars = []
        if not r.paper_only:
            ci = 0.0 if math.isnan(r.ci95) else 100 * r.ci95
            bars.append((y0 + 4, 100 * r.mean, ci, OURS_COLOR))
        if r.paper:
            bars.append((y0 + 15, r.paper.mean, r.paper.ci95 or 0.0, PAPER_COLOR))
        for y, mean, ci, color in bars:
            out.append(f'<rect x="{left}" y="{y}" width="{x(mean) - left:.1f}" height="10" fill="{color}" '
                       f'opacity="0.85"><title>{mean:.2f} ± {ci:.2f}</title></rect>')
            if ci > 0:
                out.append(f'<path d="M{x(mean - ci):.1f} {y + 5}H{x(mean + ci):.1f}M{x(mean - ci):.1f} {y + 1}'
                           f'V{y + 9}M{x(mean + ci):.1f} {y + 1}V{y + 9}" stroke="#1a202c" fill="none"/>')
    out.append("</svg>")
    return "".join(out)


def curve_chart(table: BenchmarkTable) -> str:
    """Validation score (%) against training wall-clock seconds, one line per run; '' when no curves."""
    series = [(r, c) for r in table.rows + table.other_rows for c in r.curves if c]
    if not series:
        return ""
    xs = [p[1] for _, c in series for p in c]
    ys = [100 * p[2] for _, c in series for p in c]
    x_hi = max(max(xs), 1e-9)
    y_lo, y_hi = math.floor(min(ys) / 10) * 10, min(100.0, math.ceil(max(ys) / 10) * 10)
    if y_hi <= y_lo:
        y_hi = y_lo + 10
    left, top, width, height = 50, 24, 460, 220

    def px(v: float) -> float:
        return left + width * v / x_hi

    def py(v: float) -> float:
        return top + height * (1 - (v - y_lo) / (y_hi - y_lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="curves" width="{left + width + 200}" '
           f'height="{top + height + 40}" role="img" aria-label="{escape(table.title)}: validation vs time">',
           f'<text x="{left}" y="14">validation {escape(table.metric)} % vs training wall-clock (s)</text>',
           f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#a0aec0"/>']
    clip = f"clip-{table.anchor}"  # lines (and their stroke width) stay inside the plot box
    out.append(f'<clipPath id="{escape(clip)}"><rect x="{left}" y="{top}" width="{width}" height="{height}"/>'
               f'</clipPath>')
    for t in _ticks(y_lo, y_hi):
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in _ticks(0.0, x_hi):
        out.append(f'<text x="{px(t):.1f}" y="{top + height + 16}" text-anchor="middle">{t:g}</text>')
    rows = []
    for r, _ in series:
        if r not in rows:
            rows.append(r)
    for r, c in series:
        color = PALETTE[rows.index(r) % len(PALETTE)]
        points = " ".join(f"{px(p[1]):.1f},{py(100 * p[2]):.1f}" for p in c)
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.6" '
                   f'clip-path="url(#{escape(clip)})"/>')
    for i, r in enumerate(rows):
        color = PALETTE[i % len(PALETTE)]
        name = f"{r.label} · {r.preset}" + ("" if r.digest == table.reference_digest else " (≠ episodes)")
        # The swatch is a tspan: the page's CSS colours svg text, which beats a fill attribute on <text>.
        out.append(f'<text x="{left + width + 12}" y="{top + 12 + 16 * i}"><tspan fill="{color}">■</tspan> '
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


def render_html(tables: Sequence[BenchmarkTable], problems: Sequence[str] = ()) -> str:
    """The whole ``leaderboard.html`` page as text."""
    out = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>metabench leaderboard</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>metabench leaderboard</h1>",
           "<p>Generated by <code>metabench leaderboard</code> from the run records; do not edit by hand. "
           "Click a column heading to sort.</p>",
           "<details><summary>How to read it</summary>", _methods_html(), "</details>"]
    if problems:
        out.append('<p class="warn">Skipped record files:</p><ul>')
        out += [f"<li>{escape(p)}</li>" for p in problems]
        out.append("</ul>")
    out.append('<nav><ul>' + "".join(f'<li><a href="#{escape(t.anchor)}">{escape(t.title)}</a></li>'
                                     for t in tables) + "</ul></nav>")
    for table in tables:
        out.append(f'<section id="{escape(table.anchor)}"><h2>{escape(table.title)}</h2>')
        if table.rows:
            out.append(f"<p>Test episodes: {table.rows[0].episodes}, digest <code>{escape(table.reference_digest)}"
                       f"</code>. Bold: best and not significantly worse (paired test).</p>")
            out += _table_html(table, table.rows + table.paper_rows, "ref", f"t-{table.anchor}")
        if table.other_rows:
            digests = ", ".join(f"<code>{escape(d[:12])}</code>" for d in sorted({r.digest for r in table.other_rows}))
            out.append(f'<p class="warn">Different test episodes — not comparable with the table above '
                       f"(digest {digests}); never ranked with it.</p>")
            out += _table_html(table, table.other_rows, "other", f"o-{table.anchor}")
        out.append('<div class="charts">' + bar_chart(table) + curve_chart(table) + "</div></section>")
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out) + "\n"
