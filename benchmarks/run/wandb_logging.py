"""Weights & Biases logging: Lightning's WandbLogger, offline automatically when no API key is configured.

The key is never read into a config, a record or a log: we only ask whether one exists.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from metabench.run.records import Record

# wandb >= 0.31 talks to api.forge.coreweave.com by default and, failing a netrc entry for it, uses the
# entry for api.wandb.ai behind it (which older releases used alone).
_FORGE_HOST, _WANDB_HOST = "api.forge.coreweave.com", "api.wandb.ai"


def _netrc_hosts() -> tuple[str, ...]:
    """The netrc machines wandb looks up: its server's host[:port], normalized as wandb does it."""
    import wandb

    url = os.environ.get("WANDB_BASE_URL", "").strip()
    try:  # this release's default server, or WANDB_BASE_URL
        base = wandb.Settings(base_url=url).base_url if url else wandb.Settings().base_url
    except ValueError:  # an address wandb refuses: it will not log in with it either
        return ()
    host = urlsplit(base).netloc
    return (host, _WANDB_HOST) if host == _FORGE_HOST else (host,)


def has_api_key() -> bool:
    """Whether W&B credentials are configured: ``WANDB_API_KEY``, an identity token file, or a netrc entry
    (``$NETRC`` or ``~/.netrc``) for the server; the key itself is never returned or kept."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    # An explicit path, as wandb reads it: no refusal of a group-readable ~/.netrc that wandb would still use.
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entries = netrc.netrc(str(path))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any((auth := entries.authenticators(host)) and auth[2] for host in _netrc_hosts())


def sweep_hyperparameters(params: dict[str, Any], held: dict[str, Any]) -> dict[str, Any]:
    """What to log as a sweep run's config, given the parameters W&B already ``held`` in it (locked: updates of those
    keys are ignored): keys it holds with the same value are not sent again, and a section it holds with another
    value (the agent's ``algorithm`` is the name, ours the whole section) is logged beside it as ``<key>_config``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in held:
            out[key] = value
        elif held[key] != value:
            out[f"{key}_config"] = value
    return out


def make_wandb_logger(config: Any, run_dir: Path):
    """A WandbLogger for ``config`` writing under ``run_dir``; offline unless a key exists or WANDB_MODE says.

    In a W&B Sweep run (started by ``wandb agent``) the hyper-parameters go through :func:`sweep_hyperparameters`,
    so that the full configuration is in the run's config next to the sweep's parameters.
    """
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    class SweepAwareWandbLogger(WandbLogger):
        @rank_zero_only
        def log_hyperparams(self, params: Any) -> None:
            run = self.experiment
            if run.sweep_id:
                params = sweep_hyperparameters(dict(params), run.config.as_dict())
            super().log_hyperparams(params)

    mode = os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{config.benchmark}-{config.algorithm.name}-{config.preset}-s{config.trainer.seed}"
    return SweepAwareWandbLogger(project=os.environ.get("WANDB_PROJECT", "metabench"), name=name, save_dir=str(run_dir),
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
