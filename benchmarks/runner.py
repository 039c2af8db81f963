"""Run one benchmark x algorithm: data, model, Lightning training with checkpoints, fixed-episode test, record.

Seeds: ``trainer.seed`` seeds the initialization (Lightning's ``seed_everything``) and the training episodes
(batch ``g`` is drawn from ``(seed, g)``); the test episodes are fixed by ``episodes.eval_seed`` and named by
their digest, identical for every algorithm and seed.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import secrets
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar

from metabench.config import ConfigError, RunConfig
from metabench.datasets.base import ImageSplit
from metabench.datasets.datamodule import EpisodicDataModule
from metabench.datasets.episodes import EpisodeSpec
from metabench.datasets.registry import get_dataset
from metabench.models.algorithms import MetaLearner, build_algorithm
from metabench.models.backbones import build_backbone
from metabench.models.problems import Classification, Segmentation, mean_ci95
from metabench.records import Record, git_commit, versions, write_record


@dataclass
class RunResult:
    record: Record
    record_path: Path
    run_dir: Path


class _Clock(Callback):
    """Accumulates training wall-clock across resumes (stored in the checkpoint)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = self.elapsed()
        self._start = None

    def elapsed(self) -> float:
        return self.seconds + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds = float(state_dict["seconds"])


class _Curve(Callback):
    """The validation curve ``[[step, training seconds, validation mean], ...]``, kept in the checkpoint."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.points: list[list[float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end runs after the module's on_validation_epoch_end, which sets last_val_mean.
        mean = getattr(pl_module, "last_val_mean", None)
        if trainer.sanity_checking or mean is None:
            return
        self.points.append([int(trainer.global_step), round(self.clock.elapsed(), 3), mean])

    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [list(p) for p in state_dict.get("points", [])]


def task_of(config: RunConfig) -> str:
    """"classification" or "segmentation": what the benchmark's dataset is labelled for."""
    return getattr(get_dataset(config.data.name), "task", "classification")


def build_datamodule(config: RunConfig, device: torch.device | None = None,
                     load_split: Callable[[str], ImageSplit] | None = None) -> EpisodicDataModule:
    """The benchmark's episodes: splits from the dataset registry (or ``load_split``), fixed evaluation episodes."""
    info = get_dataset(config.data.name)
    load = load_split or functools.partial(info.load, root=config.data.root, cache_dir=config.data.cache_dir,
                             **config.data.options) if info.needs_root else functools.partial(
        info.load, **config.data.options)
    ep = config.episodes
    spec = EpisodeSpec(ep.ways, ep.shots, ep.queries)
    train_spec = EpisodeSpec(ep.ways, ep.train_shots or ep.shots, ep.train_queries or ep.queries)
    return EpisodicDataModule(load, spec, config.algorithm.meta_batch, train_spec=train_spec,
                              seed=config.trainer.seed, eval_seed=ep.eval_seed, val_episodes=ep.val_episodes,
                              test_episodes=ep.test_episodes, eval_batch=ep.eval_batch,
                              resident_device=device if config.data.resident or load_split else None)


def build_module(config: RunConfig, datamodule: EpisodicDataModule) -> MetaLearner:
    """Backbone + problem + algorithm for ``config`` (image shape read from the training split)."""
    channels, height, _ = datamodule.train_sampler.split.image_shape
    task = task_of(config)
    # Classification backbones output ``ways`` logits; segmentation networks ``ways + 1`` per pixel (background).
    backbone = build_backbone(config.model.backbone, channels, config.episodes.ways, height,
                              **config.model.options)
    if getattr(backbone, "task", "classification") != task:
        raise ConfigError(f"model.backbone {config.model.backbone!r} is a "
                          f"{getattr(backbone, 'task', 'classification')} network but {config.data.name!r} is a "
                          f"{task} dataset (segmentation uses conv4-seg)")
    if config.algorithm.name == "transfer" and (task != "segmentation" or config.episodes.ways != 1):
        raise ConfigError(f"algorithm transfer needs class-agnostic labels (1-way segmentation); "
                          f"{config.benchmark} is {config.episodes.ways}-way {task}")
    problem = (Segmentation(dice_weight=config.algorithm.dice_weight) if task == "segmentation"
               else Classification(invert=config.model.invert))
    try:
        return build_algorithm(backbone, problem, config.algorithm, config.trainer.max_steps)
    except ValueError as error:  # e.g. an algorithm.adapt prefix that names no parameter
        raise ConfigError(f"{config.benchmark}/{config.algorithm.name}: {error}") from error


def pick_device(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if accelerator != "auto":
            raise RuntimeError(f"accelerator {accelerator!r} requested but no CUDA device is available")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_dir_for(config: RunConfig) -> Path:
    return Path(config.out_dir) / config.benchmark / f"{config.algorithm.name}-{config.preset}-seed{config.trainer.seed}"


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and tips and two warnings that do not apply here."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Our evaluation loaders are single-process iterables of known length; the warning is about workers.
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*with manual optimization and every_n_train_steps.*")


def run(config: RunConfig, *, resume: bool = False, progress: bool = True, write: bool = True) -> RunResult:
    """Train ``config.algorithm`` on ``config.benchmark``, test on the fixed episodes, write the record."""
    quiet_lightning()
    device = pick_device(config.trainer.accelerator)
    if config.trainer.cpu_threads is not None:
        if config.trainer.cpu_threads < 1:
            raise ValueError(f"trainer.cpu_threads must be >= 1, got {config.trainer.cpu_threads}")
        torch.set_num_threads(config.trainer.cpu_threads)
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    datamodule = build_datamodule(config, device)
    module = build_module(config, datamodule)
    initial = copy.deepcopy(module.backbone.state_dict())  # for the random-init baseline
    run_dir = run_dir_for(config)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if not resume and last.exists():
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or remove the folder")
    clock = _Clock()
    curve = _Curve(clock)
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=config.trainer.checkpoint_every, save_last=True,
                        save_top_k=0, save_on_train_epoch_end=False),
        clock,
        curve,
    ]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, config.trainer.log_every // 5)))
    logger = _logger(config, run_dir)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=config.trainer.max_steps,
        max_time={"minutes": config.trainer.max_time_minutes} if config.trainer.max_time_minutes else None,
        val_check_interval=config.trainer.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        log_every_n_steps=config.trainer.log_every, inference_mode=False, logger=logger or False, callbacks=callbacks,
        enable_progress_bar=progress, enable_model_summary=False, default_root_dir=str(run_dir),
        deterministic=False)
    if logger is not None:
        logger.log_hyperparams(config.to_dict())
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume and last.exists() else None)
    if module.global_step < config.trainer.max_steps and not config.trainer.max_time_minutes:
        raise RuntimeError(f"training stopped at step {module.global_step} of {config.trainer.max_steps}")

    start = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    eval_seconds = time.perf_counter() - start
    scores = module.test_scores.tolist()

    # The same adaptation from the run's own random initialization: what meta-training bought.
    baseline = build_module(config, datamodule)
    baseline.backbone.load_state_dict(initial)
    trainer_b = L.Trainer(accelerator=trainer.accelerator, devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, inference_mode=False)
    trainer_b.test(baseline, datamodule=datamodule, verbose=False)
    base_mean, base_ci = mean_ci95(baseline.test_scores.tolist())
    baseline_summary = {"random_init_mean": base_mean, "random_init_ci95": base_ci}
    baseline_summary.update({f"random_init_{k}": v for k, v in baseline.test_metrics.items()})

    mean, ci = mean_ci95(scores)
    train_seconds = clock.elapsed()
    record = Record(
        run_id=f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}",
        benchmark=config.benchmark, algorithm=config.algorithm.name, preset=config.preset,
        config={**config.to_dict(), "resolved": {"engine": module.engine, "engine_seconds": module.engine_timings}},
        seed=config.trainer.seed, episode_digest=datamodule.digest("test"),
        num_episodes=len(scores), metric=module.problem.metric_name, scores=scores, mean=mean, ci95=ci,
        training_steps=int(module.global_step), train_seconds=train_seconds, eval_seconds=eval_seconds,
        tasks_per_second=module.global_step * config.algorithm.meta_batch / max(train_seconds, 1e-9),
        device=device_name(device), versions=versions(), git_commit=git_commit(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        baseline=baseline_summary, metrics=dict(module.test_metrics), curve=[list(p) for p in curve.points])
    path = write_record(record, config.records_dir) if write else Path()
    if logger is not None:
        _log_final(logger, record, path)
    return RunResult(record, path, run_dir)


def _logger(config: RunConfig, run_dir: Path):
    if config.logger == "none":
        return None
    if config.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger
        return CSVLogger(str(run_dir), name="logs")
    if config.logger == "wandb":
        from metabench.wandb_logging import make_wandb_logger
        return make_wandb_logger(config, run_dir)
    raise ValueError(f"unknown logger {config.logger!r}; use none, csv or wandb")


def _log_final(logger: Any, record: Record, path: Path) -> None:
    if config_logger_is_wandb(logger):
        from metabench.wandb_logging import log_record
        log_record(logger, record, path)


def config_logger_is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"
