"""Terminal report of finished runs: one comparison table (rich)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from metabench.run.records import Record


def comparison_table(records: Sequence[Record]) -> Table:
    """Rows: algorithms; columns: test score +- 95% CI, random init + same adaptation, steps, time, digest."""
    first = records[0]
    table = Table(title=f"{first.benchmark}: {first.num_episodes} fixed test episodes "
                        f"(digest {first.episode_digest[:12]})")
    for column in ("algorithm", f"test {first.metric} (95% CI)", "random init + same adaptation",
                   "steps", "train time", "tasks/s", "device"):
        table.add_column(column)
    for r in records:
        base = r.baseline.get("random_init_mean")
        base_ci = r.baseline.get("random_init_ci95")
        table.add_row(r.algorithm, f"{100 * r.mean:.2f} +- {100 * r.ci95:.2f} %",
                      "-" if base is None else f"{100 * base:.2f} +- {100 * base_ci:.2f} %",
                      str(r.training_steps), f"{r.train_seconds:.0f} s", f"{r.tasks_per_second:.1f}", r.device)
    return table


def print_comparison(records: Sequence[Record], paths: Sequence[Path] = (), console: Console | None = None) -> None:
    # Piped output (logs, CI) would otherwise wrap the table at 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    if not records:
        console.print("no finished runs")
        return
    digests = {r.episode_digest for r in records}
    if len(digests) > 1:
        console.print("[bold red]warning:[/] these runs were tested on different episodes; not comparable")
    console.print(comparison_table(records))
    for path in paths:
        if str(path) not in ("", "."):
            console.print(f"record: {path}")
