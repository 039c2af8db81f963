"""Meta-iteration speed of each engine (``metabench bench speed``): protocol x algorithm x engine, incl. learn2learn.

One meta-iteration is what a training step does, without Lightning: (optionally) sample a meta-batch of
episodes from a device-resident random split, adapt every task, meta-gradient and optimizer step (MAML,
FOMAML: Adam on the meta-loss; Reptile: the interpolation step). Engines:

- ``batched``, ``vmap``, ``sequential``: metabench's inner loop (``metabench.models.inner_loop``); per protocol
  the fastest of ``engine_candidates(device)`` -- the engine ``engine: auto`` keeps -- is marked as the fast path;
- ``learn2learn``: ``l2l.algorithms.MAML`` clone / adapt / backward per task (MAML and FOMAML only), when
  learn2learn is installed.

Timing: ``warmup`` iterations, then the median of ``iterations``; each iteration is timed in two parts
(sampling + gathering, then the step), so "end to end" = median(sample + step) and "step" = median(step) come
from the same iterations. CUDA is synchronised around each part. Ratios are computed within one run only.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one step of the ``batched`` engine (convolutions and
matmuls, forward and all backward passes); achieved FLOP/s = that count / each engine's median step time.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the step; on CPU the
growth of the process's peak resident set (``VmHWM`` after resetting it via ``/proc/self/clear_refs``, else
``ru_maxrss``) over the first step. With ``isolate`` (the default) every cell runs in a fresh subprocess, so
allocator caches of one engine never hide another's memory; the first step is the one measured (later steps
reuse freed heap and would read ~0).

    metabench bench speed --algorithm maml --iterations 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from metabench.config import resolve
from metabench.datasets.base import ImageSplit
from metabench.datasets.episodes import EpisodeSampler, EpisodeSpec, MetaBatch
from metabench.models.backbones import build_backbone
from metabench.models.inner_loop import (InnerConfig, adapt_tasks, engine_candidates, functional_loss, meta_backward,
                                         meta_loss, reptile_update)
from metabench.models.problems import Classification
from metabench.records import git_commit

PROTOCOLS = ("omniglot-5w1s", "omniglot-20w1s", "mini-imagenet-5w1s", "mini-imagenet-5w5s")
ALGORITHMS = ("maml", "fomaml", "reptile")
ENGINES = ("batched", "vmap", "sequential", "learn2learn")
IMAGE_SHAPES = {"omniglot": (1, 28, 28), "synthetic-glyphs": (1, 28, 28), "mini-imagenet": (3, 84, 84)}


@dataclass(frozen=True)
class Protocol:
    """The training-step shape of one algorithm on one benchmark (from its default preset)."""

    benchmark: str
    algorithm: str
    backbone: str
    options: dict
    invert: bool
    image_shape: tuple[int, int, int]
    ways: int
    shots: int
    queries: int
    meta_batch: int
    steps: int
    lr: float
    loss_scale: float
    optimizer: str
    inner_batch: int | None
    meta_lr: float

    @property
    def first_order(self) -> bool:
        return self.algorithm != "maml"


def protocol(benchmark: str, algorithm: str, tiny: bool = False) -> Protocol:
    """The :class:`Protocol` of ``algorithm`` on ``benchmark``; ``tiny`` shrinks it for tests (hidden 4,
    meta-batch 2, at most 2 inner steps)."""
    config = resolve(benchmark, algorithm)
    ep, alg = config.episodes, config.algorithm
    options = dict(config.model.options)
    meta_batch, steps, inner_batch = alg.meta_batch, alg.inner_steps, alg.inner_batch
    if tiny:
        options["hidden"] = 4
        meta_batch, steps = 2, min(steps, 2)
        inner_batch = None if inner_batch is None else min(inner_batch, 4)
    return Protocol(benchmark, algorithm, config.model.backbone, options, config.model.invert,
                    IMAGE_SHAPES[config.data.name], ep.ways, ep.train_shots or ep.shots,
                    ep.train_queries or ep.queries, meta_batch, steps, alg.inner_lr, alg.inner_loss_scale,
                    alg.inner_optimizer, inner_batch, alg.meta_lr)


def random_split(shape: tuple[int, int, int], per_class: int, classes: int = 64, seed: int = 0) -> ImageSplit:
    """Random uint8 images grouped by class: stands in for a dataset when only speed matters."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (classes * per_class, *shape), dtype=np.uint8))
    return ImageSplit("random", images, np.arange(classes + 1) * per_class,
                      tuple(f"c{k}" for k in range(classes)), tuple(f"i{k}" for k in range(classes * per_class)))


# -- one meta-iteration per engine ---------------------------------------------------------------------------

class Stepper:
    """Model, optimizer and the step function of one (protocol, engine) cell."""

    def __init__(self, proto: Protocol, engine: str, device: torch.device, seed: int = 0,
                 task_chunk: int | None = None) -> None:
        torch.manual_seed(seed)
        self.task_chunk = task_chunk  # MAML/FOMAML: back-propagate the meta-loss this many tasks at a time
        channels, size, _ = proto.image_shape
        self.proto, self.engine, self.device = proto, engine, device
        self.model = build_backbone(proto.backbone, channels, proto.ways, size, **proto.options).to(device)
        self.problem = Classification(invert=proto.invert)
        self.inner_loss = lambda out, y: F.cross_entropy(out, y) * proto.loss_scale
        self.task_loss = functional_loss(self.model, self.inner_loss)
        self.config = InnerConfig(proto.steps, proto.lr, proto.first_order, proto.optimizer,
                                  per_step_batches=proto.inner_batch is not None)
        self.optimizer: torch.optim.Optimizer | None = None
        self.generator = torch.Generator().manual_seed(seed)
        if proto.algorithm == "reptile":
            if engine == "learn2learn":
                raise ValueError("learn2learn has no Reptile")
        else:
            fused = {"fused": True} if device.type == "cuda" else {}
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=proto.meta_lr, **fused)
        if engine == "learn2learn":
            import learn2learn as l2l  # optional baseline, never a runtime dependency

            self.l2l = l2l.algorithms.MAML(self.model, lr=proto.lr, first_order=proto.first_order)

    def step(self, batch: MetaBatch) -> None:
        sx, sy = self.problem.inputs(batch.support_x), batch.support_y
        qx, qy = self.problem.inputs(batch.query_x), batch.query_y
        if self.proto.algorithm == "reptile":
            self._reptile(sx, sy)
            return
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        if self.engine == "learn2learn":
            for t in range(sx.shape[0]):  # learn2learn's documented loop: clone, adapt, backward per task
                learner = self.l2l.clone()
                for _ in range(self.proto.steps):
                    learner.adapt(self.inner_loss(learner(sx[t]), sy[t]))
                (self.inner_loss(learner(qx[t]), qy[t]) / sx.shape[0]).backward()
        else:
            # as MAML.training_step: the preset's (scaled) loss for the inner steps and the query loss
            params = dict(self.model.named_parameters())
            if self.task_chunk is not None:
                meta_backward(self.model, params, self.inner_loss, sx, sy, qx, qy, self.config, self.engine,
                              self.task_chunk)
            else:
                loss, _ = meta_loss(self.model, params, self.inner_loss, sx, sy, qx, qy, self.config, self.engine)
                loss.backward()
        self.optimizer.step()

    def _reptile(self, sx: torch.Tensor, sy: torch.Tensor) -> None:
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        if self.proto.inner_batch is not None:  # the Reptile module's minibatches: a shuffled cycle per step
            steps, size, n = self.proto.steps, self.proto.inner_batch, sx.shape[1]
            order = torch.randperm(n, generator=self.generator)
            rows = order[torch.arange(steps * size) % n].reshape(steps, size).to(sx.device)
            sx, sy = sx[:, rows], sy[:, rows]
        adapted = adapt_tasks(params, self.task_loss, sx, sy, self.config, self.engine)
        new = reptile_update(params, adapted, self.proto.meta_lr)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(new[name])


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


def peak_memory_mib(device: torch.device, fn: Callable[[], None]) -> tuple[float | None, str]:
    """Run ``fn`` once; return its peak memory growth in MiB and how it was measured."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda max_memory_allocated"
    base = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        how = "VmHWM growth (clear_refs reset)"
    except OSError:
        how = "ru_maxrss growth"
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = _rss_kib("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if base is None or peak is None:
        return None, "unavailable"
    if not how.startswith("VmHWM"):
        base = max(base, before_max)
    return max(peak - base, 0) / 1024, how


def count_flops(stepper: Stepper, batch: MetaBatch) -> int:
    """FLOPs of one step (convs and matmuls, forward and backward) by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        stepper.step(batch)
    return int(counter.get_total_flops())


def measure_cell(cell: dict) -> dict:
    """Time one (protocol, algorithm, engine) cell; ``cell`` holds benchmark, algorithm, engine, device,
    iterations, warmup, tiny, threads, flops (bool)."""
    if cell.get("threads"):
        torch.set_num_threads(int(cell["threads"]))
    device = torch.device(cell["device"])
    proto = protocol(cell["benchmark"], cell["algorithm"], cell.get("tiny", False))
    per_class = proto.shots + proto.queries
    split = random_split(proto.image_shape, per_class=max(20, per_class))
    sampler = EpisodeSampler(split, EpisodeSpec(proto.ways, proto.shots, proto.queries))
    images = split.images.to(device)  # episodes resident on the device: no DataLoader on the hot path
    rng = np.random.default_rng(0)
    stepper = Stepper(proto, cell["engine"], device, task_chunk=cell.get("task_chunk"))

    def sample() -> MetaBatch:
        return sampler.gather(sampler.sample(rng, proto.meta_batch), images)

    first = sample()
    memory, memory_how = peak_memory_mib(device, lambda: stepper.step(first))
    step_times, total_times = [], []
    for i in range(cell["warmup"] + cell["iterations"]):
        _sync(device)
        start = time.perf_counter()
        batch = sample()
        _sync(device)
        sampled = time.perf_counter()
        stepper.step(batch)
        _sync(device)
        end = time.perf_counter()
        if i >= cell["warmup"]:
            step_times.append(end - sampled)
            total_times.append(end - start)
    chunk = cell.get("task_chunk")
    row = {"benchmark": proto.benchmark, "algorithm": proto.algorithm,
           "engine": cell["engine"] + (f"/chunk{chunk}" if chunk else ""), "task_chunk": chunk,
           "meta_batch": proto.meta_batch, "inner_steps": proto.steps, "ways": proto.ways, "shots": proto.shots,
           "queries": proto.queries, "iterations": len(step_times),
           "step_ms": 1000 * statistics.median(step_times), "end_to_end_ms": 1000 * statistics.median(total_times),
           "step_ms_all": [round(1000 * t, 2) for t in step_times],
           "peak_memory_mib": memory, "memory_method": memory_how}
    if cell.get("flops"):
        row["flops"] = count_flops(stepper, first)
    return row


def _run_isolated(cell: dict) -> dict:
    """``measure_cell`` in a fresh interpreter (clean heap for the memory number)."""
    code = "import json,sys; from metabench.speed import measure_cell; print(json.dumps(measure_cell(json.load(sys.stdin))))"
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


def run_speed(benchmarks: list[str], algorithms: list[str], engines: list[str], device: torch.device,
              iterations: int, warmup: int, tiny: bool = False, isolate: bool = True, threads: int | None = None,
              log: Callable[[str], None] = print, task_chunk: int | None = None) -> list[dict]:
    """Measure every cell; add ratios against learn2learn and sequential within each (benchmark, algorithm).

    ``task_chunk``: also measure the "batched" engine with the meta-gradient back-propagated ``task_chunk``
    tasks at a time (MAML/FOMAML; row engine "batched/chunk<k>"), for its peak memory.
    """
    have_l2l = learn2learn_available()
    candidates = engine_candidates(device)
    rows = []
    for benchmark in benchmarks:
        for algorithm in algorithms:
            group = []
            chunked = [("batched", task_chunk)] if task_chunk and "batched" in engines and algorithm != "reptile" else []
            for engine, chunk in [(e, None) for e in engines] + chunked:
                if engine == "learn2learn" and (not have_l2l or algorithm == "reptile"):
                    continue
                cell = {"benchmark": benchmark, "algorithm": algorithm, "engine": engine, "device": str(device),
                        "iterations": iterations, "warmup": warmup, "tiny": tiny, "threads": threads,
                        "flops": chunk is None and (engine == "batched" or engine == engines[0]), "task_chunk": chunk}
                row = _run_isolated(cell) if isolate else measure_cell(cell)
                group.append(row)
                log(f"  {benchmark} {algorithm} {engine}: step {row['step_ms']:.1f} ms, end-to-end "
                    f"{row['end_to_end_ms']:.1f} ms, peak {row['peak_memory_mib'] or 0:.0f} MiB")
            # The fast path is what `engine: auto` would keep: the fastest of its candidates, measured here.
            timed = [r for r in group if r["engine"] in candidates and r.get("task_chunk") is None]
            fast = min(timed, key=lambda r: r["step_ms"])["engine"] if timed else None
            for r in group:
                r["fast_path"] = r["engine"] == fast and r.get("task_chunk") is None
            flops = next((r["flops"] for r in group if "flops" in r), None)
            ref = {r["engine"]: r for r in group}
            for r in group:
                r["flops"] = flops
                r["gflop_per_s"] = None if flops is None else flops / (r["step_ms"] / 1000) / 1e9
                for name in ("learn2learn", "sequential"):
                    r[f"speedup_vs_{name}"] = ref[name]["step_ms"] / r["step_ms"] if name in ref else None
                    r[f"memory_vs_{name}"] = (r["peak_memory_mib"] / ref[name]["peak_memory_mib"]
                                              if name in ref and r["peak_memory_mib"] and ref[name]["peak_memory_mib"]
                                              else None)
            rows.extend(group)
    return rows


def format_table(rows: list[dict]) -> str:
    def num(value, fmt: str) -> str:
        return "-".rjust(int(fmt.split(".")[0])) if value is None else format(value, fmt)

    head = (f"| {'protocol':<19} | {'alg':<7} | {'engine':<15} | step ms | end-to-end ms | x l2l | x seq | "
            f"GFLOP/s | peak MiB |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        engine = r["engine"] + (" *" if r.get("fast_path") else "")
        lines.append(f"| {r['benchmark']:<19} | {r['algorithm']:<7} | {engine:<15} | {r['step_ms']:7.1f} | "
                     f"{r['end_to_end_ms']:13.1f} | {num(r['speedup_vs_learn2learn'], '5.2f')} | "
                     f"{num(r['speedup_vs_sequential'], '5.2f')} | {num(r['gflop_per_s'], '7.2f')} | "
                     f"{num(r['peak_memory_mib'], '8.0f')} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from metabench.runner import device_name, pick_device

    device = pick_device(args.accelerator)
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = args.engine or [e for e in ENGINES if device.type == "cuda" or e != "vmap"]
    rows = run_speed(args.protocol or list(PROTOCOLS), args.algorithm or ["maml"], engines, device,
                     args.iterations, args.warmup, tiny=args.tiny, isolate=not args.no_isolate,
                     threads=args.threads, task_chunk=getattr(args, "task_chunk", None))
    table = format_table(rows)
    print(table)
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or "results/speed") / f"speed-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "speed", "device": device_name(device), "machine": platform.machine(),
                               "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
                               "git_commit": git_commit(),
                               "fast_engine": "auto: the fastest of " + ", ".join(engine_candidates(device))
                                              + " per protocol (rows marked fast_path)", "tiny": args.tiny,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "iterations": args.iterations, "warmup": args.warmup, "rows": rows,
                               "table": table}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
