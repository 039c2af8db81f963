"""Meta-iteration time of each algorithm under a benchmark's preset (a benchmark, not a test).

Runs the real Lightning module and optimizer for a few steps on random images of the benchmark's shape (so no
dataset is needed) and reports the median time of a training step (forward, inner loop, meta-gradient,
optimizer), episode gathering excluded. Numbers from one run are comparable with each other only.

The engine is resolved exactly as in a run: the preset's ``algorithm.engine``; under ``auto`` the module times
its candidates on its first training step and keeps the fastest. That first step (the probe) is never timed, and
the engine printed is the module's after training, with the probe's seconds per candidate.

    metabench bench steps --benchmark omniglot-5w1s --steps 10
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

from metabench.config import preset_algorithms, resolve
from metabench.records import git_commit
from metabench.runner import build_module, device_name, pick_device
from metabench.speed import StepTimer, fit_for_timing, quiet, stand_in_datamodule


def time_steps(benchmark: str, algorithm: str, preset: str | None, steps: int, warmup: int,
               accelerator: str) -> dict:
    """Median seconds of ``steps`` training steps of ``algorithm`` under ``preset`` after ``warmup`` steps (at
    least one under ``engine: auto``: the probe step); ``engine`` is the one the module ran."""
    quiet()
    config = resolve(benchmark, algorithm, preset)
    device = pick_device(accelerator)
    if config.trainer.cpu_threads is not None:  # as runner._prepare: threads, seed, data, module
        torch.set_num_threads(config.trainer.cpu_threads)
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    datamodule = stand_in_datamodule(config, device)
    module = build_module(config, datamodule)
    skip = max(warmup, 1) if config.algorithm.engine == "auto" else warmup  # the probe step times every candidate
    timer = StepTimer()
    fit_for_timing(module, datamodule, device, skip + steps, [timer])
    measured = timer.step_seconds[skip:]
    return {"benchmark": benchmark, "algorithm": algorithm, "preset": config.preset,
            "configured_engine": config.algorithm.engine, "engine": module.engine,
            "engine_timings": dict(module.engine_timings),
            "meta_batch": config.algorithm.meta_batch, "inner_steps": config.algorithm.inner_steps,
            "warmup": skip, "steps_timed": len(measured), "median_s": statistics.median(measured),
            "min_s": min(measured), "device": device_name(device)}


def describe(row: dict) -> str:
    """One line: the engine the module ran (and, under ``auto``, what its probe measured) and the median."""
    engine = row["engine"]
    if row["configured_engine"] == "auto":
        probe = ", ".join(f"{name} {1000 * s:.0f} ms" for name, s in row["engine_timings"].items())
        engine = f"{engine} (auto; first step: {probe or 'one candidate, not timed'})"
    return (f"{row['benchmark']} {row['algorithm']} ({row['preset']}, engine {engine}, meta-batch "
            f"{row['meta_batch']}, {row['inner_steps']} inner steps): median {1000 * row['median_s']:.0f} "
            f"ms/iteration over {row['steps_timed']} steps on {row['device']}")


def main(args: argparse.Namespace) -> int:
    rows = []
    for algorithm in args.algorithm or preset_algorithms(args.benchmark, args.preset):
        row = time_steps(args.benchmark, algorithm, args.preset, args.steps, args.warmup, args.accelerator)
        rows.append(row)
        print(describe(row))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "step-time", "machine": platform.machine(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "git_commit": git_commit(),
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0
