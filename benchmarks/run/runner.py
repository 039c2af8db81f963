"""Run one benchmark x algorithm: data, model, Lightning training with checkpoints, fixed-episode test, record.

Seeds: ``trainer.seed`` seeds the initialization (Lightning's ``seed_everything``) and the training episodes
(batch ``g`` is drawn from ``(seed, g)``); the test episodes are fixed by ``episodes.eval_seed`` and named by
their digest, identical for every algorithm and seed.

Processes: ``trainer.strategy: ddp`` with ``trainer.devices`` x ``trainer.num_nodes`` processes runs Lightning's
DDP launch (its own processes, or those of torchrun / SLURM, which Lightning detects) with :class:`MetaDDP`.
Every process runs this whole file's flow on its share of the work (``benchmarks/core/distributed.py``); only rank 0
writes the record, checkpoints (Lightning) and logs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import secrets
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy

from metabench.core.allocator import retain_freed_memory
from metabench.core.atomic import atomic_write_bytes
from metabench.core.distributed import check_world
from metabench.core.stats import mean_ci95
from metabench.datasets.base import ImageSplit
from metabench.datasets.datamodule import EpisodicDataModule
from metabench.datasets.episodes import EpisodeSpec
from metabench.datasets.registry import CLASSIFICATION, SEGMENTATION, get_dataset
from metabench.datasets.supervised import SupervisedDataModule
from metabench.models.algorithms import MetaLearner
from metabench.models.backbones import build_backbone
from metabench.models.inner_loop import default_engine
from metabench.models.learners import algorithms_that, build_algorithm, learner_class
from metabench.models.problems import Classification, Segmentation
from metabench.run.baselines import load_baseline, save_baseline
from metabench.run.checkpoints import LAST, PREVIOUS, KeepPreviousCheckpointIO, lost_process, readable_checkpoint
from metabench.run.config import (
    TEST_KEYS,
    TEST_PROTOCOL_KEYS,
    TRAIN_SHAPE,
    ConfigError,
    RunConfig,
    flatten_config,
    training_shape,
)
from metabench.run.provenance import TrainingSessions, protocol_changes, record_provenance, sessions_in_checkpoint
from metabench.run.records import Record, git_commit, versions, write_record
from metabench.run.wandb_logging import log_record, make_wandb_logger
from metabench.run.weights import save_run_weights


@dataclass
class RunResult:
    record: Record
    record_path: Path
    run_dir: Path
    primary: bool = True  # rank 0 (the only process that writes); False on the other ranks of a DDP run


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


class MetaDDP(DDPStrategy):
    """Lightning's DDP strategy (process launch, torchrun / SLURM environments, gloo on CPU and NCCL on GPU,
    rank-0 checkpoints and loggers) WITHOUT the ``DistributedDataParallel`` wrapper.

    The meta-learners average their own meta-gradient (``MetaLearner.sync_meta_gradient``): DDP's reducer
    assumes one backward per forward, which Reptile's hand-set gradients and chunked or second-order MAML do not
    follow. Only the initial weights are broadcast from rank 0 (they are equal anyway: same seed)."""

    def configure_ddp(self) -> None:
        _sync_module_states(self.model)


STRATEGIES = ("auto", "ddp")


def world_size(config: RunConfig) -> int:
    """Processes of the run (devices x nodes); checks the strategy and that every rank gets a task."""
    t = config.trainer
    if t.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got {t.strategy!r}")
    if t.devices < 1 or t.num_nodes < 1:
        raise ConfigError(f"trainer.devices and trainer.num_nodes must be >= 1, got {t.devices}, {t.num_nodes}")
    size = t.devices * t.num_nodes
    if size > 1 and t.strategy != "ddp":
        raise ConfigError(f"{t.devices} devices x {t.num_nodes} nodes need --strategy ddp (trainer.strategy)")
    if size > 1 and not learner_class(config.algorithm.name).capabilities.ddp_exact:
        exact = algorithms_that("ddp_exact")
        raise ConfigError(f"{config.algorithm.name} runs in one process: several processes split a meta-batch by "
                          f"tasks, exact for {', '.join(exact)} only (batch statistics over a whole "
                          "batch, or early stopping on a validation loss, would differ per process)")
    if size > 1 and config.algorithm.inner_state == "persistent":
        raise ConfigError("algorithm.inner_state=persistent runs in one process: each task's inner Adam state starts "
                          "where the previous task's ended, so the tasks of a meta-batch cannot be split")
    try:
        check_world(config.algorithm.meta_batch, size)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return size


def _strategy(config: RunConfig) -> Any:
    return MetaDDP(process_group_backend=None) if config.trainer.strategy == "ddp" else "auto"


def task_of(config: RunConfig) -> str:
    """CLASSIFICATION or SEGMENTATION: what the benchmark's dataset is labelled for (the one source of it)."""
    return get_dataset(config.data.name).task


def build_datamodule(config: RunConfig, device: torch.device | None = None,
                     load_split: Callable[[str], ImageSplit] | None = None) -> EpisodicDataModule:
    """The benchmark's episodes: splits from the dataset registry (or ``load_split``), fixed evaluation episodes."""
    load = load_split or functools.partial(get_dataset(config.data.name).load, root=config.data.root,
                                           cache_dir=config.data.cache_dir, **config.data.options)
    ep = config.episodes
    spec = EpisodeSpec(ep.ways, ep.shots, ep.queries)
    train_spec = EpisodeSpec(ep.train_ways or ep.ways, ep.train_shots or ep.shots, ep.train_queries or ep.queries)
    kwargs: dict[str, Any] = dict(
        train_spec=train_spec, seed=config.trainer.seed, eval_seed=ep.eval_seed, val_episodes=ep.val_episodes,
        test_episodes=ep.test_episodes, eval_batch=ep.eval_batch,
        resident_device=device if config.data.resident or load_split else None)
    if learner_class(config.algorithm.name).capabilities.supervised_pretraining:  # mini-batches of the training split
        pretrain = config.algorithm.pretrain
        return SupervisedDataModule(load, spec, config.algorithm.meta_batch, batch_size=pretrain.batch_size,
                                    augment=pretrain.augment, **kwargs)
    return EpisodicDataModule(load, spec, config.algorithm.meta_batch, **kwargs)


def build_module(config: RunConfig, datamodule: EpisodicDataModule) -> MetaLearner:
    """Backbone + problem + algorithm for ``config`` (image shape read from the training split)."""
    channels, height, _ = datamodule.train_sampler.split.image_shape
    task = task_of(config)
    ways = _network_ways(config, datamodule)
    # Classification backbones output ``ways`` logits; segmentation networks ``ways + 1`` per pixel (background).
    backbone = build_backbone(config.model.backbone, channels, ways, height, **config.model.options)
    network_task = getattr(backbone, "task", CLASSIFICATION)
    if network_task != task:
        raise ConfigError(f"model.backbone {config.model.backbone!r} is a {network_task} network but "
                          f"{config.data.name!r} is a {task} dataset (segmentation uses conv4-seg)")
    problem = (Segmentation(dice_weight=config.algorithm.dice_weight) if task == SEGMENTATION
               else Classification(invert=config.model.invert))
    try:
        return build_algorithm(backbone, problem, config.algorithm, config.trainer.max_steps)
    except ValueError as error:  # e.g. an algorithm.adapt prefix that names no parameter, transfer on N-way
        raise ConfigError(f"{config.benchmark}/{config.algorithm.name}: {error}") from error


def _network_ways(config: RunConfig, datamodule: EpisodicDataModule) -> int:
    """The network's outputs: the episodes' ways, or (baseline, baseline++) the training classes, which its
    pre-training head classifies. Training episodes of other ways only for networks without a head (protonet)."""
    ep, algorithm = config.episodes, config.algorithm
    capabilities = learner_class(algorithm.name).capabilities
    if ep.train_ways not in (None, ep.ways) and not capabilities.way_free:
        free = algorithms_that("way_free")
        raise ConfigError(f"episodes.train_ways={ep.train_ways} differs from episodes.ways={ep.ways}: only "
                          f"{', '.join(free)} can train on episodes of other ways (the others' head has one "
                          f"output per way)")
    if not capabilities.supervised_pretraining:
        return ep.ways
    classes = datamodule.train_sampler.split.num_classes
    if algorithm.pretrain.classes is not None and algorithm.pretrain.classes < classes:
        raise ConfigError(f"algorithm.pretrain.classes={algorithm.pretrain.classes} is fewer than the "
                          f"{classes} classes of the training split")
    return algorithm.pretrain.classes or classes


def pick_device(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if accelerator != "auto":
            raise RuntimeError(f"accelerator {accelerator!r} requested but no CUDA device is available")
    return torch.device("cpu")


def device_name(device: torch.device, processes: int = 1) -> str:
    """The machine as records name it, e.g. ``cpu (x86_64, 2 cores)``, with ``x N processes`` when N > 1."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return name if processes == 1 else f"{name} x {processes} processes"


def run_dir_for(config: RunConfig) -> Path:
    name = f"{config.algorithm.name}-{config.preset}-seed{config.trainer.seed}"
    return Path(config.out_dir) / config.benchmark / name


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and tips and two warnings that do not apply here."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Our evaluation loaders are single-process iterables of known length; the warning is about workers.
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*with manual optimization and every_n_train_steps.*")
    # Under DDP the logged evaluation metrics are computed from the scores of every rank (gathered in order), so
    # they are already the same everywhere: Lightning's advice to reduce them again does not apply.
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


def configure_process(config: RunConfig) -> None:
    """The process-wide settings a configuration asks for: torch's CPU threads (``trainer.cpu_threads``) and
    keeping freed memory in the process (``trainer.retain_memory``; where there is no glibc it changes nothing)."""
    threads = config.trainer.cpu_threads
    if threads is not None:
        if threads < 1:
            raise ValueError(f"trainer.cpu_threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if config.trainer.retain_memory:
        retain_freed_memory()


def _prepare(config: RunConfig) -> tuple[torch.device, EpisodicDataModule, MetaLearner, dict[str, torch.Tensor]]:
    """Threads, seed, data and the module; also the module's random initialization (for the baseline).

    The order (seed, data, module) is fixed: ``metabench test`` rebuilds the same initialization this way.
    """
    quiet_lightning()
    processes = world_size(config)  # a bad strategy / world fails before any data is read
    device = pick_device(config.trainer.accelerator)
    configure_process(config)
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    # Several processes: the images stay on the host until Lightning has given each process its device (the data
    # module's setup moves them there), rather than every process first filling the default GPU.
    datamodule = build_datamodule(config, device if processes == 1 else torch.device("cpu"))
    module = build_module(config, datamodule)
    return device, datamodule, module, copy.deepcopy(module.backbone.state_dict())


def run(config: RunConfig, *, resume: bool = False, progress: bool = True, write: bool = True) -> RunResult:
    """Train ``config.algorithm`` on ``config.benchmark``, test on the fixed episodes, write the record."""
    device, datamodule, module, initial = _prepare(config)
    run_dir = run_dir_for(config)
    ckpt_dir = run_dir / "checkpoints"
    if not resume and any((ckpt_dir / name).exists() for name in (LAST, PREVIOUS)):
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or remove the folder")
    start = readable_checkpoint(ckpt_dir) if resume else None
    primary = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    if resume and start is None and primary:
        print(f"metabench: nothing to resume in {run_dir} (no checkpoints/last.ckpt): starting a fresh run",
              file=sys.stderr)
    if start is not None and start.note and primary:
        print(start.note, file=sys.stderr)
    # What metabench test checks; every process writes the same bytes, atomically.
    atomic_write_bytes(run_dir / "config.json", (json.dumps(config.to_dict(), indent=1) + "\n").encode(),
                       durable=False)
    clock = _Clock()
    curve = _Curve(clock)
    sessions = TrainingSessions()
    trainer, logger = _fit(config, module, datamodule, device, run_dir, clock, curve, progress,
                           None if start is None else start.path, sessions)
    # A resumed run says where it continued from (the last session's start; earlier resumes are in the curve's clock).
    resumed = {} if start is None else {"resumed_from": {"checkpoint": start.path.name, "step": start.step}}
    record = _test_record(config, trainer, module, datamodule, device, initial, steps=int(module.global_step),
                          train_seconds=clock.elapsed(), curve=curve.points, resolved=resumed,
                          sessions=sessions.sessions, run_dir=run_dir)
    if not trainer.is_global_zero:  # one record per run, whatever the number of processes
        return RunResult(record, Path(), run_dir, primary=False)
    save_run_weights(run_dir, module, record)
    path = write_record(record, config.records_dir) if write else Path()
    if logger is not None and config.logger == "wandb":
        log_record(logger, record, path)
    return RunResult(record, path, run_dir)


def _fit(config: RunConfig, module: MetaLearner, datamodule: EpisodicDataModule, device: torch.device, run_dir: Path,
         clock: _Clock, curve: _Curve, progress: bool, start: Path | None,
         sessions: TrainingSessions | None = None) -> tuple[L.Trainer, Any]:
    """Lightning training (from checkpoint ``start`` when given) with checkpoints every ``checkpoint_every`` steps,
    written atomically with the previous one kept (``benchmarks/run/checkpoints.py``); ``last.ckpt`` holds the final
    step. A lost process of a several-process run ends it with one line (:class:`LostProcessError`)."""
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=config.trainer.checkpoint_every, save_last=True,
                        save_top_k=0, save_on_train_epoch_end=False),
        clock,
        curve,
        *([sessions] if sessions is not None else []),
    ]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, config.trainer.log_every // 5)))
    logger = _logger(config, run_dir)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=config.trainer.devices,
        num_nodes=config.trainer.num_nodes, strategy=_strategy(config), use_distributed_sampler=False,
        max_steps=config.trainer.max_steps,
        max_time={"minutes": config.trainer.max_time_minutes} if config.trainer.max_time_minutes else None,
        val_check_interval=config.trainer.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        limit_val_batches=1.0 if datamodule.validates else 0,  # val_episodes 0: the split holds no validation
        log_every_n_steps=config.trainer.log_every, inference_mode=False, logger=logger or False, callbacks=callbacks,
        enable_progress_bar=progress, enable_model_summary=False, default_root_dir=str(run_dir),
        deterministic=False, plugins=[KeepPreviousCheckpointIO()])
    if logger is not None:
        logger.log_hyperparams(config.to_dict())
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=None if start is None else str(start))
    except Exception as error:
        lost = lost_process(error, trainer, int(module.global_step))
        if lost is None:
            raise
        raise lost from None
    stopped_early = getattr(module, "stopped_early", False)  # protonet's patience on the validation loss
    if module.global_step < config.trainer.max_steps and not config.trainer.max_time_minutes and not stopped_early:
        raise RuntimeError(f"training stopped at step {module.global_step} of {config.trainer.max_steps}")
    # The periodic checkpoint may predate the last step (max_steps not a multiple of checkpoint_every):
    # last.ckpt must hold the final weights, which ``metabench test`` evaluates.
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    return trainer, logger


def _test_record(config: RunConfig, trainer: L.Trainer, module: MetaLearner, datamodule: EpisodicDataModule,
                 device: torch.device, initial: dict[str, torch.Tensor], *, steps: int, train_seconds: float,
                 curve: list[list[float]], resolved: dict[str, Any], sessions: list[list[int]],
                 run_dir: Path | None = None) -> Record:
    """Test ``module`` on the fixed test episodes (with ``trainer``, so its logger sees the test metrics), run
    the random-init baseline (kept in ``run_dir`` when given: :func:`baseline_column`), and build the record of a
    run trained for ``steps`` in ``train_seconds`` (in ``sessions``: :class:`TrainingSessions`)."""
    start = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    eval_seconds = time.perf_counter() - start
    scores = module.test_scores.tolist()
    mean, ci = mean_ci95(scores)
    processes = trainer.world_size
    baseline, kept = baseline_column(config, datamodule, initial, device, run_dir, processes, module.engine)
    return Record(
        run_id=f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}",
        benchmark=config.benchmark, algorithm=config.algorithm.name, preset=config.preset,
        config={**config.to_dict(), "resolved": {"engine": module.engine, "engine_seconds": module.engine_timings,
                                                 "processes": processes, **resolved, **kept}},
        seed=config.trainer.seed, episode_digest=datamodule.digest("test"),
        num_episodes=len(scores), metric=module.problem.metric_name, scores=scores, mean=mean, ci95=ci,
        training_steps=steps, train_seconds=train_seconds, eval_seconds=eval_seconds,
        tasks_per_second=steps * config.algorithm.meta_batch / max(train_seconds, 1e-9),
        device=device_name(device, processes), versions=versions(), git_commit=git_commit(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        baseline=baseline,
        metrics=dict(module.test_metrics), curve=[list(p) for p in curve],
        **record_provenance(module, datamodule, processes, sessions))


def _test_trainer(device: torch.device) -> L.Trainer:
    """A Trainer for evaluation only: gradients on (adaptation needs them), no logger, no progress bar.

    One device per process: under DDP every process evaluates its round-robin share of the batches (the
    data module and the module split and gather by the process group, not by the Trainer), on its own GPU."""
    gpu = device.type == "cuda"
    return L.Trainer(accelerator="gpu" if gpu else "cpu", devices=[torch.cuda.current_device()] if gpu else 1,
                     logger=False, enable_progress_bar=False,
                     enable_model_summary=False, inference_mode=False)


def _random_init_baseline(config: RunConfig, datamodule: EpisodicDataModule, initial: dict[str, torch.Tensor],
                          device: torch.device, engine: str = "auto") -> dict[str, float]:
    """The same adaptation from the run's own random initialization, on the same episodes: what meta-training
    bought. ``engine``: the inner-loop engine it adapts with ("auto": the device's untimed fallback,
    :func:`metabench.models.inner_loop.default_engine`, as every record before ``baseline.engine`` was made)."""
    baseline = build_module(config, datamodule)
    baseline.backbone.load_state_dict(initial)
    if engine != "auto":
        baseline.engine = engine
    _test_trainer(device).test(baseline, datamodule=datamodule, verbose=False)
    mean, ci = mean_ci95(baseline.test_scores.tolist())
    summary = {"random_init_mean": mean, "random_init_ci95": ci}
    summary.update({f"random_init_{k}": v for k, v in baseline.test_metrics.items()})
    return summary


def baseline_engine(engine: str, device: torch.device) -> str:
    """The engine a record's random-init column adapts with: the tested module's (``engine``: the run's choice, or
    the configured one), or the device's fallback where nothing chose one (an algorithm without adaptation)."""
    return default_engine(device) if engine == "auto" else engine


def baseline_column(config: RunConfig, datamodule: EpisodicDataModule, initial: dict[str, torch.Tensor],
                    device: torch.device, run_dir: Path | None, processes: int = 1, engine: str = "auto"
                    ) -> tuple[dict[str, float], dict[str, Any]]:
    """The random-init baseline of ``config``'s test, adapted with the tested module's ``engine``
    (:func:`baseline_engine`), and what the record says about it (``{"baseline": {"engine": ..., ...}}``).

    With a ``run_dir``, one evaluated for exactly this protocol, engine, these episodes, code, libraries and device is
    reused from it, and one evaluated here is kept there (``metabench/run/baselines.py``). Several processes
    evaluate it together without the folder: every process must take the same branch of a collective evaluation.
    """
    engine = baseline_engine(engine, device)
    if run_dir is None or processes > 1:
        return _random_init_baseline(config, datamodule, initial, device, engine), {"baseline": {"engine": engine}}
    digest, where = datamodule.digest("test"), device_name(device)
    kept = load_baseline(run_dir, config, digest, where, engine)
    if kept is not None:
        return kept.summary, {"baseline": {"engine": engine, **kept.provenance(reused=True)}}
    start = time.perf_counter()
    summary = _random_init_baseline(config, datamodule, initial, device, engine)
    kept = save_baseline(run_dir, config, digest, where, engine, summary, time.perf_counter() - start)
    return summary, {"baseline": {"engine": engine, **kept.provenance(reused=False)}}


def trained_config(config: RunConfig, benchmark: str | None = None) -> dict[str, Any] | None:
    """The configuration the run in ``config``'s run folder (under ``benchmark``'s runs, default its own) was
    trained with (its ``config.json``), if saved."""
    path = trained_run_dir(config, benchmark) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def trained_run_dir(config: RunConfig, benchmark: str | None = None) -> Path:
    """The run folder ``metabench test`` evaluates: ``config``'s own, or the same run trained under ``benchmark``."""
    return run_dir_for(config if benchmark is None else dataclasses.replace(config, benchmark=benchmark))


def with_training_shape(tested: RunConfig, trained: RunConfig | dict[str, Any]) -> RunConfig:
    """``tested`` with the training episode shape it leaves null taken from the trained run (as training used it),
    so that another evaluation shape (``--set episodes.shots=5``) does not read as another training."""
    before = training_shape(flatten_config(trained if isinstance(trained, dict) else trained.to_dict()))
    filled = {f"train_{k}": getattr(tested.episodes, f"train_{k}") or before.get(f"episodes.train_{k}")
              for k in TRAIN_SHAPE}
    return dataclasses.replace(tested, episodes=dataclasses.replace(tested.episodes, **filled))


def check_test_overrides(trained: RunConfig | dict[str, Any], tested: RunConfig, *,
                         other_benchmark: bool = False) -> None:
    """Refuse a ``metabench test`` configuration that differs from the trained one outside the test protocol.

    Training episode shapes are compared as training used them (:func:`metabench.run.config.training_shape`);
    ``algorithm.source`` (a citation) is not compared, nor ``benchmark`` when the run was trained under another
    benchmark on purpose (``--trained-benchmark``: e.g. Reptile's 1-shot and 5-shot cells share one training). A key
    the trained configuration lacks (a run saved before that key existed) counts as its default value.
    """
    before = training_shape(flatten_config(trained if isinstance(trained, dict) else trained.to_dict()))
    defaults = training_shape(flatten_config(RunConfig().to_dict()))
    ignored = {*TEST_KEYS, *(("benchmark",) if other_benchmark else ())}
    changed = [key for key, value in training_shape(flatten_config(tested.to_dict())).items()
               if before.get(key, defaults.get(key)) != value and key not in ignored]
    if changed:
        raise ConfigError(f"metabench test evaluates a trained run: it may change only the test protocol "
                          f"({', '.join(TEST_PROTOCOL_KEYS)}) and where or how it runs, not {', '.join(changed)}")


def test_run(config: RunConfig, *, trained: RunConfig | None = None, trained_benchmark: str | None = None,
             write: bool = True) -> RunResult:
    """Evaluate a finished run's final weights (``<run dir>/checkpoints/last.ckpt``) on ``config``'s test
    episodes, e.g. another number of queries per class, and write a second record for the same run.

    The record carries the checkpoint's training steps, training time and validation curve, and
    ``config.resolved.tested_checkpoint``. The random-init baseline is rebuilt from the run's seed (the same
    initialization as the run's own), or reused from the run folder (:func:`baseline_column`). ``config`` may differ
    from the training configuration (the run folder's ``config.json``, else ``trained``) only in
    :data:`metabench.run.config.TEST_KEYS`. Raises ``FileNotFoundError`` without a checkpoint, ``ConfigError`` for
    another change and ``ValueError`` when training had not finished.

    ``trained_benchmark``: the run was trained under that benchmark (its run folder there): allowed only when its
    training configuration is this one's (e.g. Reptile's Omniglot 5w5s cell from the 5w1s training run, whose
    shots change only the evaluation); the record names it in ``config.resolved.trained_run``.
    """
    config, run_dir, reference, resolved = _tested_config(config, trained, trained_benchmark, checkpoint=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    device, datamodule, module, initial = _prepare(config)
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    step = int(checkpoint.get("global_step", 0))
    stopped_early = (checkpoint.get("metabench_early_stop") or {}).get("stopped", False)
    if step < config.trainer.max_steps and not config.trainer.max_time_minutes and not stopped_early:
        raise ValueError(f"{last} is at step {step} of {config.trainer.max_steps}: training has not finished "
                         f"(finish it with metabench run ... --resume); a partial run is not tested")
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)  # the engine the run chose
    states = checkpoint.get("callbacks", {})
    seconds = next((float(v["seconds"]) for k, v in states.items() if _Clock.__name__ in k), float("nan"))
    points = next((v["points"] for k, v in states.items() if _Curve.__name__ in k), [])
    trainer = _test_trainer(device)
    # The training run's values where this test changes the protocol ({}: none): metabench verify retrains so.
    trained_values = {} if reference is None else {"trained": protocol_changes(reference, config)}
    record = _test_record(config, trainer, module, datamodule, device, initial, steps=step, train_seconds=seconds,
                          curve=points, resolved={"tested_checkpoint": {"path": last.as_posix(), "step": step},
                                                  **resolved, **trained_values},
                          sessions=sessions_in_checkpoint(checkpoint), run_dir=run_dir)
    save_run_weights(run_dir, module, record)
    path = write_record(record, config.records_dir) if write else Path()
    return RunResult(record, path, run_dir)


@dataclass(frozen=True)
class BaselineResult:
    """``metabench test --baseline-only``: the random-init column of a test protocol, kept in its run folder."""

    summary: dict[str, float]
    provenance: dict[str, Any]  # as a record's config.resolved.baseline says it
    num_episodes: int


def baseline_only(config: RunConfig, *, trained_benchmark: str | None = None) -> BaselineResult:
    """Evaluate (or find) the random-init baseline of the test :func:`test_run` would make of ``config``, and keep
    it in the run folder, where that test (or the run's own, at the end of its training) reuses it.

    The baseline needs no trained weights, so this runs while the run still trains, or before it starts. With the
    run folder's ``config.json``, ``config`` is checked and completed as :func:`test_run` does it (so that it is
    kept under the test's key); before the run exists there is nothing to check it against, and the key (the whole
    protocol) is what makes only the same run or test reuse it.
    """
    config, run_dir, _, _ = _tested_config(config, None, trained_benchmark)
    if world_size(config) > 1:
        raise ConfigError("--baseline-only evaluates in one process: leave trainer.devices / num_nodes at 1")
    device, datamodule, module, initial = _prepare(config)
    # The engine the test will adapt with: the configured one, else what "auto" chose on the run's first step (in
    # its checkpoints, read as a test reads it); before the run has chosen, the fallback.
    start = readable_checkpoint(run_dir / "checkpoints")
    if start is not None:
        module.on_load_checkpoint(torch.load(start.path, map_location="cpu", weights_only=False))
    summary, kept = baseline_column(config, datamodule, initial, device, run_dir, engine=module.engine)
    return BaselineResult(summary, kept["baseline"], datamodule.test_episodes)


def _tested_config(config: RunConfig, trained: RunConfig | None, trained_benchmark: str | None, *,
                   checkpoint: bool = False
                   ) -> tuple[RunConfig, Path, RunConfig | dict[str, Any] | None, dict[str, Any]]:
    """``metabench test``'s configuration checked against the trained run's: the configuration as tested (training
    shape filled in), the run folder, the trained configuration (None if unknown) and what the record's
    ``config.resolved`` says about a run trained under another benchmark. ``checkpoint``: the run folder must
    hold ``checkpoints/last.ckpt`` (``FileNotFoundError``, before anything else is checked)."""
    if trained_benchmark == config.benchmark:
        trained_benchmark = None
    run_dir = trained_run_dir(config, trained_benchmark)
    last = run_dir / "checkpoints" / "last.ckpt"
    if checkpoint and not last.is_file():
        raise FileNotFoundError(f"no trained run to test: {last} does not exist (train it with metabench run "
                                f"with the same benchmark, algorithm, preset, seed and --out-dir)")
    reference = trained_config(config, trained_benchmark)
    if reference is None and trained_benchmark is not None:
        raise ConfigError(f"{run_dir} has no config.json: a run trained under another benchmark is tested only when "
                          "its training configuration can be checked")
    reference = reference or trained
    resolved: dict[str, Any] = {}
    if reference is not None:
        if trained_benchmark is None:  # under another benchmark, its own preset must describe the same training
            config = with_training_shape(config, reference)
        check_test_overrides(reference, config, other_benchmark=trained_benchmark is not None)
    if trained_benchmark is not None:
        resolved["trained_run"] = {"benchmark": trained_benchmark, "run_dir": run_dir.as_posix(),
                                   "why": "same training configuration (checked); only the test protocol differs"}
    return config, run_dir, reference, resolved


def _logger(config: RunConfig, run_dir: Path):
    if config.logger == "none":
        return None
    if config.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger
        return CSVLogger(str(run_dir), name="logs")
    if config.logger == "wandb":
        return make_wandb_logger(config, run_dir)
    raise ValueError(f"unknown logger {config.logger!r}; use none, csv or wandb")

