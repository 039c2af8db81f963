"""Meta-iteration speed of each engine (``metabench bench speed``): protocol x algorithm x engine, incl. learn2learn.

One meta-iteration is THE training step users run, not a copy of it: the benchmark's Lightning module
(``runner.build_module``) driven by a Lightning ``Trainer`` on the benchmark's ``EpisodicDataModule``
(``runner.build_datamodule``) over a device-resident random split of the dataset's image shape. The engine timed
is forced through the config (``algorithm.engine=<engine>``). The step is the module's own: MAML / FOMAML
``training_step`` + backward + Adam step as Lightning's automatic optimization runs it (manual optimization with
``--task-chunk``), Reptile its manual-optimization ``training_step`` (inner minibatches from
``Reptile.inner_minibatches``, the SGD interpolation step, the LR schedule). Engines:

- ``batched``, ``vmap``, ``sequential`` (``metabench.models.inner_loop.ENGINES``; ``auto`` is accepted too: the
  module then times its candidates on its first step, which is never timed); per protocol the fastest of
  ``engine_candidates(device)`` -- the engine ``engine: auto`` keeps -- is marked as the fast path;
- ``learn2learn``: ``l2l.algorithms.MAML`` clone / adapt / backward per task (MAML and FOMAML only), when
  learn2learn is installed: the outside reference, with its own loop, on the module's backbone, inner loss and
  optimizer and the same data loader.

Timing: one step for the memory number, ``warmup`` steps, then the median of ``iterations``. "step" runs from
Lightning's ``on_train_batch_start`` to ``on_train_batch_end`` (training step, backward, optimizer step);
"end to end" from the end of the previous step to the end of this one, i.e. also the data loader's sampling and
gathering of the meta-batch and Lightning's loop. CUDA is synchronised at both hooks. Ratios are computed within
one run only.

FLOPs: ``metabench.perf.flops.flop_counter`` (torch's ``FlopCounterMode`` with grouped-convolution backward counted per
group) over one extra, untimed step of the ``batched`` engine (else of the first engine listed): convolutions and
matmuls, forward and all backward passes, each derivative computed once (the sequential reference counts the same
to first order and up to 5 % more to second order, where autograd's native double backward computes gradients it
then discards); achieved FLOP/s = that count / each engine's median step time. The machine's matrix-multiply rate
(``flops.gemm_rate``: fp32 ``GEMM_SIZE``-square products, same threads) is measured in every cell right after its
steps; each row's ``gemm_fraction`` is its FLOP/s over the median of those rates in the run.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the step; on CPU the growth
of the process's peak resident set (``VmHWM`` after resetting it via ``/proc/self/clear_refs``, else
``ru_maxrss``) over the first step. With ``isolate`` (the default) every cell runs in a fresh subprocess, so
allocator caches of one engine never hide another's memory; the first step is the one measured (later steps
reuse freed heap and would read ~0).

    metabench bench speed --algorithm maml --iterations 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from metabench.core.allocator import retain_freed_memory
from metabench.datasets.base import ImageSplit
from metabench.datasets.datamodule import EpisodicDataModule
from metabench.datasets.episodes import MetaBatch
from metabench.models.algorithms import MetaLearner
from metabench.models.hparams import ENGINES as CONFIG_ENGINES
from metabench.models.inner_loop import ENGINES, engine_candidates
from metabench.perf.flops import count_flops, flop_counter, gemm_rate
from metabench.run.config import RunConfig, resolve
from metabench.run.records import git_commit
from metabench.run.runner import MetaDDP, build_datamodule, build_module, device_name, pick_device, quiet_lightning

PROTOCOLS = ("omniglot-5w1s", "omniglot-20w1s", "mini-imagenet-5w1s", "mini-imagenet-5w5s")
LEARN2LEARN = "learn2learn"  # the outside reference, timed next to metabench's engines
# The one table of image shapes: the random stand-in split is drawn before any dataset is read (the module then
# reads the shape from that split, as a run reads it from the real one). ``data.options.image_size`` overrides.
STAND_IN_SHAPES: dict[str, tuple[int, int, int]] = {"omniglot": (1, 28, 28), "synthetic-glyphs": (1, 28, 28),
                                                    "mini-imagenet": (3, 84, 84)}
GEMM_SIZE, TINY_GEMM_SIZE = 2048, 128  # the GEMM timed for the machine's rate (tiny: a smoke test's)


def speed_config(benchmark: str, algorithm: str, engine: str, tiny: bool = False,
                 task_chunk: int | None = None) -> RunConfig:
    """The default preset's config of ``algorithm`` on ``benchmark`` with ``engine`` forced (learn2learn: the
    preset's, unused) and ``task_chunk`` set; ``tiny`` shrinks it for tests (hidden 4, meta-batch 2, at most 2
    inner steps, inner batch at most 4)."""
    base = resolve(benchmark, algorithm).algorithm
    overrides = [] if engine == LEARN2LEARN else [f"algorithm.engine={engine}"]
    if task_chunk is not None:
        overrides.append(f"algorithm.task_chunk={task_chunk}")
    if tiny:
        overrides += ["model.options.hidden=4", "algorithm.meta_batch=2",
                      f"algorithm.inner_steps={min(base.inner_steps, 2)}"]
        if base.inner_batch is not None:
            overrides.append(f"algorithm.inner_batch={min(base.inner_batch, 4)}")
        if base.lslr or base.per_step_bn:  # MAML++: evaluation step i needs training step i's rates and batch norm
            overrides.append(f"algorithm.eval_steps={min(base.eval_steps, base.inner_steps, 2)}")
    return resolve(benchmark, algorithm, overrides=overrides)


def stand_in_shape(config: RunConfig) -> tuple[int, int, int]:
    """``(C, H, W)`` of ``config``'s dataset, for a random stand-in split."""
    if config.data.name not in STAND_IN_SHAPES:
        raise ValueError(f"no stand-in image shape for dataset {config.data.name!r}; known: "
                         f"{', '.join(STAND_IN_SHAPES)}")
    channels, height, width = STAND_IN_SHAPES[config.data.name]
    size = config.data.options.get("image_size")  # e.g. Omniglot's reader option
    return (channels, size, size) if size else (channels, height, width)


def random_split(shape: tuple[int, int, int], per_class: int, classes: int = 64, seed: int = 0) -> ImageSplit:
    """Random uint8 images grouped by class: stands in for a dataset when only speed matters."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (classes * per_class, *shape), dtype=np.uint8))
    return ImageSplit("random", images, np.arange(classes + 1) * per_class,
                      tuple(f"c{k}" for k in range(classes)), tuple(f"i{k}" for k in range(classes * per_class)))


def stand_in_datamodule(config: RunConfig, device: torch.device) -> EpisodicDataModule:
    """``config``'s datamodule (``runner.build_datamodule``: episode specs, meta-batch, seeds), every split one
    device-resident :func:`random_split` with enough images per class for the datamodule's own specs."""
    cache: list[ImageSplit] = []

    def load(_name: str) -> ImageSplit:  # called lazily, after ``datamodule`` exists
        if not cache:
            need = max(s.shots + s.queries for s in (datamodule.spec, datamodule.train_spec))
            cache.append(random_split(stand_in_shape(config), per_class=max(20, need)))
        return cache[0]

    datamodule = build_datamodule(config, device, load_split=load)
    return datamodule


# -- measuring ------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory growth from construction to :meth:`stop`: the CUDA allocator's, else the process's RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base: int | None = torch.cuda.memory_allocated(device)
            self.how = "cuda max_memory_allocated"
            return
        self.base = _rss_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.how = "VmHWM growth (clear_refs reset)"
        except OSError:
            self.how = "ru_maxrss growth"
            if self.base is not None:  # ru_maxrss cannot be reset: growth only counts above the old peak
                self.base = max(self.base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def stop(self) -> tuple[float | None, str]:
        """The growth in MiB and how it was measured."""
        if self.device.type == "cuda":
            _sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - (self.base or 0)) / 2**20, self.how
        vmhwm = self.how.startswith("VmHWM")
        peak = _rss_kib("VmHWM") if vmhwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self.base is None or peak is None:
            return None, "unavailable"
        return max(peak - self.base, 0) / 1024, self.how


def peak_memory_mib(device: torch.device, fn: Callable[[], None]) -> tuple[float | None, str]:
    """Run ``fn`` once; return its peak memory growth in MiB and how it was measured."""
    memory = PeakMemory(device)
    fn()
    return memory.stop()


class StepTimer(Callback):
    """Seconds of every training step, hook to hook, CUDA synchronised at both ends.

    ``step_seconds[i]``: ``on_train_batch_start`` -> ``on_train_batch_end`` of step ``i`` (the module's training
    step, backward and optimizer step); ``total_seconds[i]``: from the end of the previous step (of
    ``on_train_start`` for step 0) to the end of step ``i``, so also the data loader's sampling and gathering.
    ``memory_step`` / ``flops_step``: the step whose peak memory growth (``memory``) / FLOPs (``flops``) to measure.
    """

    def __init__(self, memory_step: int | None = None, flops_step: int | None = None) -> None:
        super().__init__()
        self.memory_step, self.flops_step = memory_step, flops_step
        self.step_seconds: list[float] = []
        self.total_seconds: list[float] = []
        self.memory: tuple[float | None, str] = (None, "not measured")
        self.flops: int | None = None
        self._start = self._last_end = 0.0
        self._peak: PeakMemory | None = None
        self._counter: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self._last_end = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = len(self.step_seconds)
        if step == self.memory_step:
            self._peak = PeakMemory(pl_module.device)
        if step == self.flops_step:
            self._counter = flop_counter()
            self._counter.__enter__()  # left in on_train_batch_end: the mode spans Lightning's whole step
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        _sync(pl_module.device)
        end = time.perf_counter()
        self.step_seconds.append(end - self._start)
        self.total_seconds.append(end - self._last_end)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = int(self._counter.get_total_flops()), None
        if self._peak is not None:
            self.memory, self._peak = self._peak.stop(), None
        self._last_end = time.perf_counter()  # the bookkeeping above is not the next step's


def fit_for_timing(module: MetaLearner, datamodule: EpisodicDataModule, device: torch.device, max_steps: int,
                   callbacks: list[Callback], processes: int = 1) -> L.Trainer:
    """Train ``module`` for ``max_steps`` steps as a run does (its optimizers, hooks, data loader), without
    validation, checkpoints, logger or progress bar; ``processes`` > 1: as ``--devices N --strategy ddp``."""
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=processes,
                        strategy=MetaDDP(process_group_backend=None) if processes > 1 else "auto",
                        use_distributed_sampler=False, max_steps=max_steps,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                        deterministic=False, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule)
    return trainer


@dataclass
class Timing:
    """What one cell measured; ``engine`` is the module's engine after the run (``auto``: its pick)."""

    step_seconds: list[float]
    total_seconds: list[float]
    memory: tuple[float | None, str]
    flops: int | None
    engine: str
    engine_timings: dict[str, float]


def _time_module(module: MetaLearner, datamodule: EpisodicDataModule, device: torch.device, cell: dict) -> Timing:
    """The module's own training steps under a Trainer: step 0 for memory (and ``auto``'s probe), ``warmup``
    steps, the timed ``iterations`` and, with ``cell["flops"]``, one more step under FlopCounterMode."""
    timed = slice(1 + cell["warmup"], 1 + cell["warmup"] + cell["iterations"])
    flops = bool(cell.get("flops"))
    timer = StepTimer(memory_step=0, flops_step=timed.stop if flops else None)
    fit_for_timing(module, datamodule, device, timed.stop + flops, [timer])
    return Timing(timer.step_seconds[timed], timer.total_seconds[timed], timer.memory, timer.flops, module.engine,
                  dict(module.engine_timings))


class Learn2LearnStep:
    """learn2learn's documented MAML loop -- clone, adapt, backward per task -- on the module's backbone, inner
    loss, inner steps and optimizer (MAML's Adam): the outside reference."""

    def __init__(self, module: MetaLearner) -> None:
        import learn2learn as l2l  # optional baseline, never a runtime dependency

        if module.config.name not in ("maml", "fomaml"):
            raise ValueError(f"learn2learn has no {module.config.name}")
        self.module, self.steps = module, module.config.inner_steps
        self.maml = l2l.algorithms.MAML(module.backbone, lr=module.config.inner_lr,
                                        first_order=not module.capabilities.second_order)
        self.optimizer: torch.optim.Optimizer = module.configure_optimizers()

    def __call__(self, batch: MetaBatch) -> None:
        problem, loss = self.module.problem, self.module.inner_loss
        sx, sy, qx, qy = problem.inputs(batch.support_x), batch.support_y, problem.inputs(batch.query_x), batch.query_y
        self.optimizer.zero_grad(set_to_none=True)
        for t in range(sx.shape[0]):
            learner = self.maml.clone()
            for _ in range(self.steps):
                learner.adapt(loss(learner(sx[t]), sy[t]))
            (loss(learner(qx[t]), qy[t]) / sx.shape[0]).backward()
        self.optimizer.step()


def _time_learn2learn(module: MetaLearner, datamodule: EpisodicDataModule, device: torch.device,
                      cell: dict) -> Timing:
    """learn2learn's loop on the datamodule's training batches: first step for memory, ``warmup``, then each
    timed iteration in two parts (the data loader's next batch, then the step); FLOPs of one more step."""
    step = Learn2LearnStep(module.to(device))
    batches = iter(datamodule.train_dataloader())
    first = next(batches).to(device)
    memory = peak_memory_mib(device, lambda: step(first))
    step_seconds, total_seconds = [], []
    for i in range(cell["warmup"] + cell["iterations"]):
        _sync(device)
        start = time.perf_counter()
        batch = next(batches).to(device)
        _sync(device)
        sampled = time.perf_counter()
        step(batch)
        _sync(device)
        end = time.perf_counter()
        if i >= cell["warmup"]:
            step_seconds.append(end - sampled)
            total_seconds.append(end - start)
    flops = count_flops(lambda: step(first)) if cell.get("flops") else None
    return Timing(step_seconds, total_seconds, memory, flops, LEARN2LEARN, {})


def quiet() -> None:
    """``runner.quiet_lightning``, plus the ``pytorch_lightning`` logger: importing learn2learn imports that
    package, which re-points Lightning's shared rank-zero logger at its own name (banners would print again)."""
    quiet_lightning()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)


def measure_cell(cell: dict) -> dict:
    """Time one (protocol, algorithm, engine) cell; ``cell`` holds benchmark, algorithm, engine, device,
    iterations, warmup, tiny, threads, flops (bool), task_chunk, retain_memory (bool: ``allocator.retain_freed_memory``
    first; with ``isolate`` it stays in the cell's own process)."""
    retained = bool(cell.get("retain_memory")) and retain_freed_memory()
    if cell.get("threads"):
        torch.set_num_threads(int(cell["threads"]))
    quiet()
    device = torch.device(cell["device"])
    config = speed_config(cell["benchmark"], cell["algorithm"], cell["engine"], cell.get("tiny", False),
                          cell.get("task_chunk"))
    datamodule = stand_in_datamodule(config, device)
    L.seed_everything(0, verbose=False)
    module = build_module(config, datamodule)
    if cell["engine"] == LEARN2LEARN:
        timing = _time_learn2learn(module, datamodule, device, cell)
    else:
        timing = _time_module(module, datamodule, device, cell)
    chunk, spec = cell.get("task_chunk"), datamodule.train_spec
    # The machine's matrix-multiply rate in this process, right after its steps: same threads, same load.
    gemm = gemm_rate(TINY_GEMM_SIZE if cell.get("tiny") else GEMM_SIZE, device=device)
    row = {"benchmark": config.benchmark, "algorithm": config.algorithm.name,
           "engine": cell["engine"] + (f"/chunk{chunk}" if chunk else ""), "module_engine": timing.engine,
           "engine_timings": timing.engine_timings, "task_chunk": chunk, "meta_batch": config.algorithm.meta_batch,
           "inner_steps": config.algorithm.inner_steps, "ways": spec.ways, "shots": spec.shots,
           "queries": spec.queries, "iterations": len(timing.step_seconds),
           "step_ms": 1000 * statistics.median(timing.step_seconds),
           "end_to_end_ms": 1000 * statistics.median(timing.total_seconds),
           "step_ms_all": [round(1000 * t, 2) for t in timing.step_seconds],
           "peak_memory_mib": timing.memory[0], "memory_method": timing.memory[1], "gemm_gflop_per_s": gemm / 1e9,
           "retain_memory": retained}
    if timing.flops is not None:
        row["flops"] = timing.flops
    return row


def _run_isolated(cell: dict) -> dict:
    """``measure_cell`` in a fresh interpreter (clean heap for the memory number)."""
    code = ("import json,sys; from metabench.perf.speed import measure_cell; "
            "print(json.dumps(measure_cell(json.load(sys.stdin))))")
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps(cell), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"speed cell {cell} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def learn2learn_available() -> bool:
    try:
        import learn2learn  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not installed" for an optional baseline
        return False
    return True


def _compare(group: list[dict], candidates: tuple[str, ...]) -> None:
    """Mark the fast path and add FLOP/s and the ratios against learn2learn and sequential, in place."""
    # The fast path is what `engine: auto` would keep: the fastest of its candidates, measured here.
    timed = [r for r in group if r["engine"] in candidates and r.get("task_chunk") is None]
    fast = min(timed, key=lambda r: r["step_ms"])["engine"] if timed else None
    counted = next((r for r in group if "flops" in r), None)
    flops = None if counted is None else counted["flops"]
    ref = {r["engine"]: r for r in group}
    for r in group:
        r["fast_path"] = r["engine"] == fast and r.get("task_chunk") is None
        r["flops"], r["flops_engine"] = flops, None if counted is None else counted["engine"]
        r["gflop_per_s"] = None if flops is None else flops / (r["step_ms"] / 1000) / 1e9
        for name in (LEARN2LEARN, "sequential"):
            r[f"speedup_vs_{name}"] = ref[name]["step_ms"] / r["step_ms"] if name in ref else None
            r[f"memory_vs_{name}"] = (r["peak_memory_mib"] / ref[name]["peak_memory_mib"]
                                      if name in ref and r["peak_memory_mib"] and ref[name]["peak_memory_mib"]
                                      else None)


def machine_gemm_rate(rows: list[dict]) -> float | None:
    """The run's matrix-multiply rate in GFLOP/s: the median of its cells' (``gemm_gflop_per_s``)."""
    rates = [r["gemm_gflop_per_s"] for r in rows if r.get("gemm_gflop_per_s")]
    return statistics.median(rates) if rates else None


def add_gemm_fraction(rows: list[dict]) -> None:
    """Each row's achieved FLOP/s as a fraction of the run's matrix-multiply rate (one denominator), in place."""
    rate = machine_gemm_rate(rows)
    for r in rows:
        r["gemm_fraction"] = None if rate is None or r.get("gflop_per_s") is None else r["gflop_per_s"] / rate


def run_speed(benchmarks: list[str], algorithms: list[str], engines: list[str], device: torch.device,
              iterations: int, warmup: int, tiny: bool = False, isolate: bool = True, threads: int | None = None,
              log: Callable[[str], None] = print, task_chunk: int | None = None,
              retain_memory: bool = False) -> list[dict]:
    """Measure every cell; add ratios against learn2learn and sequential within each (benchmark, algorithm).

    ``engines``: metabench's (``inner_loop.ENGINES``, or ``auto``) and ``learn2learn``. ``task_chunk``: also
    measure the "batched" engine with the meta-gradient back-propagated ``task_chunk`` tasks at a time
    (MAML/FOMAML; row engine "batched/chunk<k>"), for its peak memory. ``retain_memory``: every cell keeps freed
    memory in its process (``allocator.retain_freed_memory``: no page faults on fresh tensors).
    """
    unknown = [e for e in engines if e not in (*CONFIG_ENGINES, LEARN2LEARN)]
    if unknown:
        raise ValueError(f"unknown engine(s) {', '.join(unknown)}; known: {', '.join((*ENGINES, LEARN2LEARN))}")
    have_l2l = learn2learn_available()
    # FLOPs of one batched step when it is timed: the step's work, each derivative computed once (flops.py)
    flop_engine = "batched" if "batched" in engines else engines[0]
    rows = []
    for benchmark in benchmarks:
        for algorithm in algorithms:
            group = []
            chunk_it = task_chunk and "batched" in engines and algorithm != "reptile"
            chunked = [("batched", task_chunk)] if chunk_it else []
            for engine, chunk in [(e, None) for e in engines] + chunked:
                if engine == LEARN2LEARN and (not have_l2l or algorithm not in ("maml", "fomaml")):
                    continue
                cell = {"benchmark": benchmark, "algorithm": algorithm, "engine": engine, "device": str(device),
                        "iterations": iterations, "warmup": warmup, "tiny": tiny, "threads": threads,
                        "flops": chunk is None and engine == flop_engine, "task_chunk": chunk,
                        "retain_memory": retain_memory}
                row = _run_isolated(cell) if isolate else measure_cell(cell)
                group.append(row)
                log(f"  {benchmark} {algorithm} {row['engine']}: step {row['step_ms']:.1f} ms, end-to-end "
                    f"{row['end_to_end_ms']:.1f} ms, peak {row['peak_memory_mib'] or 0:.0f} MiB")
            _compare(group, engine_candidates(device))
            rows.extend(group)
    add_gemm_fraction(rows)
    return rows


def format_table(rows: list[dict]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-".rjust(int(fmt.split(".")[0])) if value is None else format(value, fmt)

    head = (f"| {'protocol':<19} | {'alg':<7} | {'engine':<15} | step ms | end-to-end ms | x l2l | x seq | "
            f"GFLOP/s | % GEMM | peak MiB |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        engine = r["engine"] + (" *" if r.get("fast_path") else "")
        lines.append(f"| {r['benchmark']:<19} | {r['algorithm']:<7} | {engine:<15} | {r['step_ms']:7.1f} | "
                     f"{r['end_to_end_ms']:13.1f} | {num(r['speedup_vs_learn2learn'], '5.2f')} | "
                     f"{num(r['speedup_vs_sequential'], '5.2f')} | {num(r['gflop_per_s'], '7.2f')} | "
                     f"{num(None if r.get('gemm_fraction') is None else 100 * r['gemm_fraction'], '6.1f')} | "
                     f"{num(r['peak_memory_mib'], '8.0f')} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    device = pick_device(args.accelerator)
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = args.engine or [e for e in (*ENGINES, LEARN2LEARN) if device.type == "cuda" or e != "vmap"]
    rows = run_speed(args.protocol or list(PROTOCOLS), args.algorithm or ["maml"], engines, device,
                     args.iterations, args.warmup, tiny=args.tiny, isolate=not args.no_isolate,
                     threads=args.threads, task_chunk=getattr(args, "task_chunk", None),
                     retain_memory=getattr(args, "retain_memory", False))
    table = format_table(rows)
    gemm = machine_gemm_rate(rows)
    print(table)
    if gemm is not None:
        print(f"matrix-multiply rate (fp32 GEMM, median over the cells): {gemm:.1f} GFLOP/s; "
              "% GEMM = a row's GFLOP/s / that rate (FLOPs: one step's work, metabench.perf.flops)")
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or "results/speed") / f"speed-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "speed", "device": device_name(device), "machine": platform.machine(),
                               "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
                               "git_commit": git_commit(),
                               "step": "the module's own Lightning training step (metabench.run.runner.build_module)",
                               "fast_engine": "auto: the fastest of " + ", ".join(engine_candidates(device))
                                              + " per protocol (rows marked fast_path)", "tiny": args.tiny,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "iterations": args.iterations, "warmup": args.warmup,
                               "retain_memory": getattr(args, "retain_memory", False),
                               "gemm": {"size": TINY_GEMM_SIZE if args.tiny else GEMM_SIZE, "dtype": "float32",
                                        "gflop_per_s": gemm,
                                        "per_cell": [r["gemm_gflop_per_s"] for r in rows]},
                               "flops": "metabench.perf.flops.flop_counter (grouped conv backward per group)",
                               "rows": rows,
                               "table": table}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
