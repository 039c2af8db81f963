"""Weights & Biases logging: Lightning's WandbLogger, offline automatically when no API key is configured.

The key is never read into a config, a record or a log: we only ask whether one exists.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from metabench.records import Record


def has_api_key() -> bool:
    """Whether W&B credentials are configured (environment or ~/.netrc); the key itself is not returned."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai")
                                            .removeprefix("https://").removeprefix("http://"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def make_wandb_logger(config: Any, run_dir: Path):
    """A WandbLogger for ``config`` writing under ``run_dir``; offline unless a key exists or WANDB_MODE says."""
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{config.benchmark}-{config.algorithm.name}-{config.preset}-s{config.trainer.seed}"
    return WandbLogger(project=os.environ.get("WANDB_PROJECT", "metabench"), name=name, save_dir=str(run_dir),
                       offline=mode == "offline", mode=mode, log_model=False,
                       tags=[config.benchmark, config.algorithm.name])


def log_record(logger: Any, record: Record, path: Path) -> None:
    """Final test metrics into the run summary, and the record file as a W&B artifact."""
    import wandb

    run = logger.experiment
    metric = record.metric
    run.summary.update({f"test/{metric}": record.mean, f"test/{metric}_ci95": record.ci95,
                        "test/episodes": record.num_episodes, "test/episode_digest": record.episode_digest,
                        "train/steps": record.training_steps, "train/seconds": record.train_seconds})
    if path and Path(path).is_file():
        artifact = wandb.Artifact(name=f"record-{record.run_id}", type="record",
                                  metadata={"benchmark": record.benchmark, "algorithm": record.algorithm})
        artifact.add_file(str(path))
        run.log_artifact(artifact)
    run.finish()
