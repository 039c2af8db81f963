"""How best to use this machine's cores: the same training step as 1 process x 1 thread, 1 process x N threads
and N processes x 1 thread (DDP, each process with its share of the meta-batch). A benchmark, not a test.

Each layout is one ``metabench bench steps`` in a fresh interpreter (``OMP_NUM_THREADS`` set before torch
loads), run one after the other, so their numbers compare within one invocation only.

    metabench bench scaling --benchmark omniglot-5w1s --algorithm maml --algorithm fomaml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metabench.run.records import git_commit

DEFAULT_LAYOUTS = ("1x1", "1x2", "2x1")


def parse_layout(text: str) -> tuple[int, int]:
    """``"PxT"`` -> (processes, threads per process), both >= 1."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ValueError(f"layout {text!r}: expected PROCESSESxTHREADS with both >= 1, e.g. 2x1")
    return int(match[1]), int(match[2])


def measure(benchmark: str, algorithm: str, preset: str | None, processes: int, threads: int, steps: int,
            warmup: int) -> dict:
    """One layout's ``bench steps`` row (median seconds per meta-batch step), run in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "steps.json"
        cmd = [sys.executable, "-m", "metabench", "bench", "steps", "--benchmark", benchmark, "--algorithm",
               algorithm, "--steps", str(steps), "--warmup", str(warmup), "--accelerator", "cpu", "--threads",
               str(threads), "--devices", str(processes), "--out", str(out)] + (["--preset", preset] if preset else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return json.loads(out.read_text())["rows"][0]


def table(rows: list[dict]) -> str:
    """Markdown: ms per step and the speed-up over each algorithm's first layout."""
    lines = ["| algorithm | layout (processes x threads) | engine | ms / step (median) | speed-up |",
             "|---|---|---|---|---|"]
    first: dict[str, float] = {}
    for row in rows:
        base = first.setdefault(row["algorithm"], row["median_s"])
        lines.append(f"| {row['algorithm']} | {row['processes']} x {row['threads']} | {row['engine']} | "
                     f"{1000 * row['median_s']:.0f} | {base / row['median_s']:.2f}x |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    layouts = [parse_layout(text) for text in (args.layout or DEFAULT_LAYOUTS)]
    rows = []
    for algorithm in args.algorithm or ["maml"]:
        for processes, threads in layouts:
            row = measure(args.benchmark, algorithm, args.preset, processes, threads, args.steps, args.warmup)
            rows.append(row)
            print(f"{algorithm} {processes} process(es) x {threads} thread(s): {1000 * row['median_s']:.0f} ms/step "
                  f"(engine {row['engine']})", flush=True)
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "scaling", "machine": platform.machine(), "cores": os.cpu_count(),
                               "torch": torch.__version__, "git_commit": git_commit(),
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0
