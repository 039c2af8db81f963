"""The leaderboard as CSV (``leaderboard.csv``, and the W&B tables' rows): the reproductions summary first, then
every table's rows, one line each with :data:`CSV_COLUMNS`."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

from metabench.report.leaderboard import (
    NO_PAPER,
    BenchmarkTable,
    PaperResult,
    Row,
    fmt,
    pct,
    steps_text,
    vs_best_text,
)
from metabench.report.reproductions import Reproduction

CSV_COLUMNS = ["benchmark", "protocol", "metric", "section", "algorithm", "backbone", "preset", "mean_pct",
               "ci95_pct", "random_init_pct", "extra_metrics_pct", "seeds", "runs", "episodes", "episode_digest",
               "best_or_tied",
               "vs_best", "paper_mean_pct", "paper_ci95_pct", "paper_source", "paper_row", "delta_pct", "verdict",
               "training_steps", "train_seconds", "test_seconds", "tasks_per_second", "device", "files", "state",
               "command"]


def _csv_row(table: BenchmarkTable | None, section: str, row: Row | None, paper: PaperResult | None,
             state: str = "", command: str = "", metric: str = "") -> list[Any]:
    """One CSV line: a row of a table, or (``table`` None) a reproduction (``row`` None: not run)."""
    ours = row is not None and not row.paper_only
    ranked = section == "ranked"
    if table is not None:
        where = [table.benchmark, table.protocol, table.metric]
    else:
        assert paper is not None
        where = [paper.benchmark, f"{paper.protocol}, {paper.test_protocol}", metric]
    verdict_ = "" if row is None or row.verdict == NO_PAPER else row.verdict
    return where + [
        section, row.algorithm if row else paper.algorithm if paper else "",
        row.backbone if row else paper.backbone if paper else "", row.preset if row else "",
        pct(row.mean, 4) if ours else "", pct(row.ci95, 4) if ours else "",
        pct(row.random_init, 4) if ours and not math.isnan(row.random_init) else "",
        ";".join(f"{k}={pct(v, 4)}" for k, v in sorted(row.metrics.items())) if row else "",
        len(row.seeds) if ours else "", row.runs if ours else "", row.episodes if ours else "",
        row.digest if row else "", ("yes" if row.tied else "no") if ranked and row else "",
        vs_best_text(row) if ranked and row else "",
        f"{paper.mean:g}" if paper else "", f"{paper.ci95:g}" if paper and paper.ci95 is not None else "",
        paper.source if paper else "", paper.row if paper else "",
        "" if row is None or row.delta is None else f"{row.delta:.4f}", verdict_,
        steps_text(row) if ours else "", fmt(row.train_seconds, 3) if ours else "",
        fmt(row.eval_seconds, 3) if ours else "", fmt(row.tasks_per_second, 3) if ours else "",
        "; ".join(row.devices) if row else "", " ".join(row.files) if row else "", state, command]


def csv_rows(tables: Sequence[BenchmarkTable], reproductions: Sequence[Reproduction] = ()) -> list[list[Any]]:
    """The CSV's lines after its header, :data:`CSV_COLUMNS` each: the reproductions first (section
    "reproduction", with their state and the commands that made our records), then every table's rows."""
    out = [_csv_row(None, "reproduction", r.row, r.paper, r.state, " ; ".join(r.commands), r.metric)
           for r in reproductions]
    for table in tables:
        for section, rows in (("ranked", table.rows), ("not comparable", table.other_rows),
                              ("paper only", table.paper_rows)):
            out += [_csv_row(table, section, row, row.paper) for row in rows]
    return out


def render_csv(tables: Sequence[BenchmarkTable], reproductions: Sequence[Reproduction] = ()) -> str:
    """The whole ``leaderboard.csv``: a header, then :func:`csv_rows`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_rows(tables, reproductions))
    return buffer.getvalue()
