"""Meta-iteration time of each algorithm under a benchmark's preset (a benchmark, not a test).

Runs the real Lightning module and optimizer for a few steps on random images of the benchmark's shape (so no
dataset is needed) and reports the median time of a training step (forward, inner loop, meta-gradient,
optimizer), episode gathering excluded. Numbers from one run are comparable with each other only.

The engine is resolved exactly as in a run: the preset's ``algorithm.engine``; under ``auto`` the module times
its candidates on its first training step and keeps the fastest. That first step (the probe) is never timed, and
the engine printed is the module's after training, with the probe's seconds per candidate.

    metabench bench steps --benchmark omniglot-5w1s --steps 10
    metabench bench steps --benchmark omniglot-5w1s --threads 1 --devices 2   # 2 processes x 1 thread (DDP)

With ``--devices N`` the step is the whole meta-batch's, split over N processes (as ``metabench run --devices N
--strategy ddp``): rank 0 times it, gradient synchronisation included, and alone prints and writes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from metabench.perf.speed import StepTimer, fit_for_timing, quiet, stand_in_datamodule
from metabench.run.config import preset_algorithms, resolve
from metabench.run.records import git_commit
from metabench.run.runner import build_module, configure_process, device_name, pick_device, world_size


def time_steps(benchmark: str, algorithm: str, preset: str | None, steps: int, warmup: int,
               accelerator: str, threads: int | None = None, processes: int = 1) -> dict | None:
    """Median seconds of ``steps`` training steps of ``algorithm`` under ``preset`` after ``warmup`` steps (at
    least one under ``engine: auto``: the probe step); ``engine`` is the one the module ran. ``threads``: torch
    threads per process (default: the preset's); ``processes``: DDP processes (None is returned off rank 0)."""
    quiet()
    overrides = [f"trainer.devices={processes}", f"trainer.strategy={'ddp' if processes > 1 else 'auto'}"]
    config = resolve(benchmark, algorithm, preset,
                     overrides=overrides + ([f"trainer.cpu_threads={threads}"] if threads else []))
    world_size(config)
    device = pick_device(accelerator)
    configure_process(config)  # as runner._prepare: process settings, seed, data, module
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    datamodule = stand_in_datamodule(config, device)
    module = build_module(config, datamodule)
    skip = max(warmup, 1) if config.algorithm.engine == "auto" else warmup  # the probe step times every candidate
    timer = StepTimer()
    trainer = fit_for_timing(module, datamodule, device, skip + steps, [timer], processes)
    if not trainer.is_global_zero:
        return None
    measured = timer.step_seconds[skip:]
    return {"benchmark": benchmark, "algorithm": algorithm, "preset": config.preset,
            "configured_engine": config.algorithm.engine, "engine": module.engine,
            "engine_timings": dict(module.engine_timings),
            "meta_batch": config.algorithm.meta_batch, "inner_steps": config.algorithm.inner_steps,
            "warmup": skip, "steps_timed": len(measured), "median_s": statistics.median(measured),
            "min_s": min(measured), "threads": torch.get_num_threads(), "processes": processes,
            "device": device_name(device, processes)}


def describe(row: dict) -> str:
    """One line: the engine the module ran (and, under ``auto``, what its probe measured) and the median."""
    engine = row["engine"]
    if row["configured_engine"] == "auto":
        probe = ", ".join(f"{name} {1000 * s:.0f} ms" for name, s in row["engine_timings"].items())
        engine = f"{engine} (auto; first step: {probe or 'one candidate, not timed'})"
    return (f"{row['benchmark']} {row['algorithm']} ({row['preset']}, engine {engine}, meta-batch "
            f"{row['meta_batch']}, {row['inner_steps']} inner steps): median {1000 * row['median_s']:.0f} "
            f"ms/iteration over {row['steps_timed']} steps, {row['processes']} process(es) x {row['threads']} "
            f"thread(s), on {row['device']}")


def main(args: argparse.Namespace) -> int:
    rows = []
    for algorithm in args.algorithm or preset_algorithms(args.benchmark, args.preset):
        row = time_steps(args.benchmark, algorithm, args.preset, args.steps, args.warmup, args.accelerator,
                         args.threads, args.devices)
        if row is None:  # not rank 0 of a DDP measurement
            continue
        rows.append(row)
        print(describe(row))
    if not rows:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "step-time", "machine": platform.machine(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "git_commit": git_commit(),
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0
