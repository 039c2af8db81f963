"""Episode throughput benchmark (not a test): episodes/s for Omniglot and mini-ImageNet 5w1s-15q.

Measures metabench's sampler from the prepared cache on ONE CPU thread (sampling + gathering into stacked
tensors, in meta-batches of 32), on the GPU with the split resident there when CUDA exists, and
learn2learn's ``TaskDataset`` over the same decoded images when learn2learn is installed. Prints a table and
writes JSON (machine, versions, numbers, ratios from the same run).

    metabench bench episodes --root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from metabench.datasets.episodes import EpisodeSampler, EpisodeSpec
from metabench.datasets.registry import get_dataset

SPEC = EpisodeSpec(5, 1, 15)
META_BATCH = 32
BENCHMARKS = (("omniglot", "train", {"scheme": "vinyals"}), ("mini-imagenet", "train", {}))


def _rate(step: Callable[[], int], seconds: float) -> float:
    """Episodes per second of ``step`` (which returns how many episodes it made), after one warm-up call."""
    step()
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        done += step()
    return done / elapsed


def _metabench_rate(sampler: EpisodeSampler, images: torch.Tensor, seconds: float) -> float:
    rng = np.random.default_rng(0)

    def step() -> int:
        batch = sampler.gather(sampler.sample(rng, META_BATCH), images)
        if images.is_cuda:
            torch.cuda.synchronize()
        return batch.tasks

    return _rate(step, seconds)


def _learn2learn_rate(sampler: EpisodeSampler, seconds: float) -> float | None:
    try:
        import learn2learn as l2l
    except ImportError:
        return None
    split = sampler.split
    # A plain indexable dataset over the same decoded uint8 images (no decoding cost on either side).
    dataset = torch.utils.data.TensorDataset(split.images, split.labels)
    meta = l2l.data.MetaDataset(dataset)
    transforms = [l2l.data.transforms.NWays(meta, SPEC.ways),
                  l2l.data.transforms.KShots(meta, SPEC.per_class),
                  l2l.data.transforms.LoadData(meta),
                  l2l.data.transforms.RemapLabels(meta),
                  l2l.data.transforms.ConsecutiveLabels(meta)]
    tasks = l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)

    def step() -> int:
        tasks.sample()
        return 1

    return _rate(step, seconds)


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # the targets are per CPU core
    rows = []
    for name, split_name, options in BENCHMARKS:
        split = get_dataset(name).load(split_name, root=args.root, cache_dir=args.cache_dir, **options)
        sampler = EpisodeSampler(split, SPEC)
        row = {"dataset": split.name, "spec": str(SPEC), "meta_batch": META_BATCH,
               "metabench_cpu_1thread": _metabench_rate(sampler, split.images, args.seconds)}
        if torch.cuda.is_available():
            row["metabench_cuda_resident"] = _metabench_rate(sampler, split.images.cuda(), args.seconds)
        l2l_rate = _learn2learn_rate(sampler, args.seconds)
        row["learn2learn_taskdataset"] = l2l_rate
        row["speedup_vs_learn2learn"] = row["metabench_cpu_1thread"] / l2l_rate if l2l_rate else None
        rows.append(row)
        line = ", ".join(f"{k} {v:,.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                         if k not in ("dataset", "spec", "meta_batch"))
        print(f"{split.name} {SPEC}: {line} (episodes/s)")
    result = {"benchmark": "episode-throughput", "machine": f"{platform.machine()} {platform.processor()}",
              "cpu_count": torch.get_num_threads(), "torch": torch.__version__,
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
