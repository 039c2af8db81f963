"""The leaderboard on Weights & Biases (``metabench leaderboard --wandb``): its tables as W&B Tables with the CSV's
columns, and the HTML page as an artifact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from metabench.report.leaderboard_csv import CSV_COLUMNS, csv_rows
from metabench.run.wandb_logging import has_api_key


def log_leaderboard(tables: Any, html_path: Path, save_dir: Path | None = None, project: str | None = None,
                    reproductions: Any = ()) -> str:
    """Log the leaderboard to W&B: the reproductions summary as a Table ("reproductions", first), every table's rows
    as a Table ("leaderboard"), both with the CSV's columns, and the HTML page as an artifact.

    One short run of job type "leaderboard"; offline unless a key exists or WANDB_MODE says. Returns the
    run's directory (where an offline run's ``.wandb`` file lives).
    """
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")
    # As the CSV writes them (text): one type per column, whatever a row leaves empty.
    summary = [[str(v) for v in row] for row in csv_rows([], reproductions)]
    rows = [[str(v) for v in row] for row in csv_rows(tables)]
    run = wandb.init(project=project or os.environ.get("WANDB_PROJECT", "metabench"), job_type="leaderboard",
                     name="leaderboard", mode=mode, dir=str(save_dir) if save_dir else None, reinit="create_new")
    try:
        logged = {"leaderboard": wandb.Table(columns=CSV_COLUMNS, data=rows)}
        if summary:
            logged = {"reproductions": wandb.Table(columns=CSV_COLUMNS, data=summary), **logged}
        run.log(logged)
        artifact = wandb.Artifact(name="leaderboard-html", type="leaderboard",
                                  metadata={"tables": len(tables), "rows": len(rows), "reproductions": len(summary)})
        artifact.add_file(str(html_path), name=Path(html_path).name)
        run.log_artifact(artifact)
        return str(run.dir)
    finally:
        run.finish()

