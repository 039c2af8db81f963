"""``metabench leaderboard``: every run record -> ``LEADERBOARD.md``, ``leaderboard.csv``, ``leaderboard.html`` and
the README's reproductions block. The top of the report layer: tables (:mod:`metabench.report.leaderboard`) ->
reproductions -> CSV and HTML -> here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from metabench.core.atomic import atomic_write_bytes
from metabench.report.leaderboard import (
    PAPER_RESULTS,
    BenchmarkTable,
    LeaderboardError,
    build_tables,
    load_paper_results,
    load_records,
    render_markdown,
)
from metabench.report.leaderboard_csv import render_csv
from metabench.report.leaderboard_html import render_html
from metabench.report.reproductions import (
    Reproduction,
    build_reproductions,
    readme_block,
    replace_block,
    summary_markdown,
)


@dataclass
class LeaderboardResult:
    """What ``metabench leaderboard`` wrote and what it skipped."""

    paths: list[Path]
    tables: list[BenchmarkTable]
    problems: list[str]
    reproductions: list[Reproduction] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 1 if self.problems else 0


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def make_leaderboard(records_dir: str | Path = "results/records", out_dir: str | Path = "results",
                     paper_results: str | Path = PAPER_RESULTS, readme: str | Path | None = None) -> LeaderboardResult:
    """Read every record, write ``LEADERBOARD.md``, ``leaderboard.csv`` and ``leaderboard.html``, and with
    ``readme`` rewrite that file's reproductions block (:func:`metabench.report.reproductions.replace_block`).

    Bad files are skipped (listed in ``problems`` and on the page); raises :class:`LeaderboardError` when
    no record is usable at all, or when ``readme`` lacks the block's markers (checked before anything is written).
    """
    readme_text = None
    if readme is not None:  # its markers are checked before anything is read or written
        readme_text = _readme_text(Path(readme))
        replace_block(readme_text, "", str(readme))
    loaded = load_records(records_dir)
    if not loaded.records:
        detail = f" ({len(loaded.problems)} file(s) skipped)" if loaded.problems else ""
        raise LeaderboardError(f"no usable run records in {records_dir}{detail}")
    papers = load_paper_results(paper_results)
    tables = build_tables(loaded.records, papers)
    reproductions = build_reproductions(tables, papers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "LEADERBOARD.md", out / "leaderboard.csv", out / "leaderboard.html"]
    _write_text(paths[0], render_markdown(tables, loaded.problems, summary_markdown(reproductions)))
    _write_text(paths[1], render_csv(tables, reproductions))
    _write_text(paths[2], render_html(tables, loaded.problems, reproductions))
    if readme is not None and readme_text is not None:
        link = Path(os.path.relpath(paths[0], Path(readme).parent)).as_posix()
        _write_text(Path(readme), replace_block(readme_text, readme_block(reproductions, link), str(readme)))
        paths.append(Path(readme))
    return LeaderboardResult(paths=paths, tables=tables, problems=loaded.problems, reproductions=reproductions)


def _readme_text(path: Path) -> str:
    if not path.is_file():
        raise LeaderboardError(f"README {path} does not exist (its reproductions block cannot be written)")
    return path.read_text(encoding="utf-8")
