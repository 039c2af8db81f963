"""Meta-iteration time of each algorithm under a benchmark's preset (a benchmark, not a test).

Runs the real Lightning module and optimizer for a few steps on random images of the benchmark's shape (so no
dataset is needed) and reports the median time of a training step (forward, inner loop, meta-gradient,
optimizer), episode gathering excluded. Numbers from one run are comparable with each other only.

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
from lightning.pytorch.callbacks import Callback

from metabench.config import preset_algorithms, resolve
from metabench.runner import build_datamodule, build_module, device_name, pick_device, quiet_lightning
from metabench.speed import IMAGE_SHAPES, random_split


class _StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)


def time_steps(benchmark: str, algorithm: str, preset: str | None, steps: int, warmup: int,
               accelerator: str) -> dict:
    config = resolve(benchmark, algorithm, preset)
    device = pick_device(accelerator)
    ep = config.episodes
    split = random_split(IMAGE_SHAPES[config.data.name],
                         per_class=max(20, (ep.train_shots or ep.shots) + (ep.train_queries or ep.queries)))
    datamodule = build_datamodule(config, device, load_split=lambda _name: split)
    L.seed_everything(0, verbose=False)
    module = build_module(config, datamodule)
    timer = _StepTimer()
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        max_steps=warmup + steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                        callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    measured = timer.times[warmup:]
    return {"benchmark": benchmark, "algorithm": algorithm, "preset": config.preset, "engine": module.engine,
            "meta_batch": config.algorithm.meta_batch, "inner_steps": config.algorithm.inner_steps,
            "steps_timed": len(measured), "median_s": statistics.median(measured), "min_s": min(measured),
            "device": device_name(device)}


def main(args: argparse.Namespace) -> int:
    quiet_lightning()
    rows = []
    for algorithm in args.algorithm or preset_algorithms(args.benchmark, args.preset):
        row = time_steps(args.benchmark, algorithm, args.preset, args.steps, args.warmup, args.accelerator)
        rows.append(row)
        print(f"{row['benchmark']} {row['algorithm']} ({row['preset']}, engine {row['engine']}, "
              f"meta-batch {row['meta_batch']}, {row['inner_steps']} inner steps): median "
              f"{1000 * row['median_s']:.0f} ms/iteration over {row['steps_timed']} steps on {row['device']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "step-time", "machine": platform.machine(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(),
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0
