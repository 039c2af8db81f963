"""Where a batched MAML / FOMAML meta-step spends its time (``metabench bench profile``): the profiler's table by
operator for each phase.

The phases of one meta-gradient on a batched engine ("batched" or "batched-fused"), built from the inner loop's
own pieces in the order ``inner_loop.adapt_batched`` / ``meta_loss`` run them (SGD inner steps; the benchmark's
preset: meta-batch, shots, queries, inner steps, loss scale, backbone):

- ``support forward``: ``batched_forward`` of every task's support images with its own (expanded) parameters and
  the summed task losses (every inner step);
- ``inner backward``: ``torch.autograd.grad`` of that sum w.r.t. the per-task parameters, with ``create_graph``
  for second-order MAML (every inner step);
- ``query forward``: the SGD update, ``batched_forward`` of the query images, the meta-loss;
- ``outer backward``: the meta-gradient (for second-order MAML: the double backward through the inner step).

Each phase runs inside a ``torch.profiler.record_function`` range; an operator's self time is charged to the
phase whose range encloses it (CPU autograd runs the backward on the calling thread, so backward operators sit
inside their phase too). Phase wall times are medians over the profiled steps; the real step
(``inner_loop.meta_loss`` + ``torch.autograd.grad``, same engine and inputs) is timed interleaved with the
decomposition, so the two totals compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from metabench.core.allocator import retain_freed_memory
from metabench.models.inner_loop import (
    BATCHED_ENGINES,
    InnerConfig,
    _inner_update,
    batched_forward_of,
    meta_loss,
    with_frozen,
)
from metabench.perf.speed import speed_config, stand_in_datamodule
from metabench.run.runner import build_module

PHASES = ("support forward", "inner backward", "query forward", "outer backward")


def _phase_of(event: object) -> str | None:
    """The phase whose ``record_function`` range encloses ``event`` (walking up its CPU parents), if any."""
    while event is not None:
        if getattr(event, "name", None) in PHASES:
            return event.name  # type: ignore[attr-defined]
        event = getattr(event, "cpu_parent", None)
    return None


class PhasedStep:
    """One batched meta-gradient of ``module`` on fixed inputs, split into :data:`PHASES`."""

    def __init__(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], config: InnerConfig,
                 engine: str = "batched") -> None:
        if config.optimizer != "sgd" or not callable(getattr(module.backbone, "batched_forward", None)):
            raise ValueError("bench profile decomposes SGD inner loops on a backbone with batched_forward "
                             f"(MAML, FOMAML); got optimizer {config.optimizer!r} on "
                             f"{type(module.backbone).__name__}")
        if engine not in BATCHED_ENGINES:
            raise ValueError(f"bench profile decomposes the batched engines ({', '.join(BATCHED_ENGINES)}), "
                             f"not {engine!r}")
        self.module, self.inputs, self.config, self.engine = module, inputs, config, engine
        self.targets = [p for p in module.parameters() if p.requires_grad]

    def phased(self, timings: dict[str, list[float]] | None = None) -> tuple[torch.Tensor | None, ...]:
        """The decomposed step; returns the meta-gradient (w.r.t. the module's trainable parameters) and appends
        each phase's wall seconds (summed over inner steps) to ``timings[phase]``."""
        model, loss_fn, config = self.module.backbone, self.module.inner_loss, self.config
        forward = batched_forward_of(model, self.engine)
        sx, sy, qx, qy = self.inputs
        tasks = sx.shape[0]
        per_task_loss = torch.func.vmap(loss_fn)
        seconds: dict[str, float] = defaultdict(float)

        def run(phase: str, fn):  # noqa: ANN001, ANN202 - a local timing wrapper
            start = time.perf_counter()
            with record_function(phase):
                out = fn()
            seconds[phase] += time.perf_counter() - start
            return out

        params = self.module.params()
        current = {k: p.expand(tasks, *p.shape) for k, p in params.items()}
        for step in range(1, config.steps + 1):
            leaves = current if not config.first_order else {k: p.detach().requires_grad_()
                                                             for k, p in current.items()}
            total = run("support forward", lambda leaves=leaves: per_task_loss(
                forward(with_frozen(model, leaves, tasks), sx), sy).sum())
            grads = run("inner backward", lambda total=total, leaves=leaves: torch.autograd.grad(
                total, list(leaves.values()), create_graph=not config.first_order))
            current = _inner_update(current, dict(zip(leaves, grads)), {}, {}, step, config)

        def query() -> torch.Tensor:
            adapted = {k: p.contiguous() for k, p in current.items()}
            return per_task_loss(forward(with_frozen(model, adapted, tasks), qx), qy).mean()

        meta = run("query forward", query)
        meta_gradient = run("outer backward", lambda: torch.autograd.grad(meta, self.targets, allow_unused=True))
        if timings is not None:
            for phase in PHASES:
                timings[phase].append(seconds[phase])
        return meta_gradient

    def real(self) -> None:
        """The inner loop's own meta-gradient (``meta_loss`` + ``torch.autograd.grad``) on the same inputs."""
        sx, sy, qx, qy = self.inputs
        loss, _ = meta_loss(self.module.backbone, self.module.params(), self.module.inner_loss, sx, sy, qx, qy,
                            self.config, self.engine)
        torch.autograd.grad(loss, self.targets, allow_unused=True)


def profile_phases(benchmark: str, algorithm: str, steps: int = 5, warmup: int = 2, top: int = 8,
                   tiny: bool = False, engine: str = "batched") -> dict:
    """Profile ``steps`` decomposed meta-steps (after ``warmup``) of ``algorithm`` on ``benchmark``'s paper preset,
    interleaved with the real step. Returns per phase its median ms and the ``top`` operators by self time per step
    (ms, calls per step), the median of the decomposed and of the real step, and the shapes profiled."""
    config = speed_config(benchmark, algorithm, engine, tiny=tiny)
    device = torch.device("cpu")
    datamodule = stand_in_datamodule(config, device)
    datamodule.setup("fit")
    module = build_module(config, datamodule)
    inputs = module._inputs(next(iter(datamodule.train_dataloader())))
    step = PhasedStep(module, inputs, module.inner_config(training=True), engine)
    for _ in range(warmup):
        step.phased()
        step.real()
    timings: dict[str, list[float]] = defaultdict(list)
    real, decomposed = [], []
    self_us: dict[tuple[str, str], float] = defaultdict(float)
    calls: dict[tuple[str, str], int] = defaultdict(int)
    for _ in range(steps):
        start = time.perf_counter()
        step.real()
        real.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step.phased(timings)
            decomposed.append(time.perf_counter() - start)
        for event in prof.events():
            phase = _phase_of(event.cpu_parent)
            if phase is not None and event.name not in PHASES:
                self_us[(phase, event.name)] += event.self_cpu_time_total
                calls[(phase, event.name)] += 1
    phases = {}
    for phase in PHASES:
        ops = sorted(((name, us) for (p, name), us in self_us.items() if p == phase), key=lambda item: -item[1])
        phases[phase] = {"ms": 1000 * statistics.median(timings[phase]),
                         "ops": [{"op": name, "self_ms": us / 1000 / steps, "calls": calls[(phase, name)] // steps}
                                 for name, us in ops[:top]],
                         "self_ms_total": sum(us for (p, _), us in self_us.items() if p == phase) / 1000 / steps}
    sx, _, qx, _ = inputs
    return {"benchmark": benchmark, "algorithm": algorithm, "engine": engine, "steps": steps, "warmup": warmup,
            "support_shape": list(sx.shape), "query_shape": list(qx.shape), "threads": torch.get_num_threads(),
            "real_step_ms": 1000 * statistics.median(real), "decomposed_step_ms": 1000 * statistics.median(decomposed),
            "phases": phases}


def format_profile(result: dict) -> str:
    """Markdown: one line per phase (median ms, share), then each phase's top operators."""
    total = sum(p["ms"] for p in result["phases"].values())
    lines = [f"{result['benchmark']} {result['algorithm']} ({result['engine']} engine, {result['threads']} "
             f"thread(s)): real step {result['real_step_ms']:.1f} ms, "
             f"decomposed {result['decomposed_step_ms']:.1f} ms "
             f"(profiled: profiler overhead included)", "",
             "| phase | ms | share | top operators by self time (ms per step, calls) |", "|---|---|---|---|"]
    for phase, p in result["phases"].items():
        ops = "; ".join(f"{o['op']} {o['self_ms']:.1f} ({o['calls']})" for o in p["ops"])
        lines.append(f"| {phase} | {p['ms']:.1f} | {100 * p['ms'] / total:.0f} % | {ops} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.retain_memory:
        retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [profile_phases(args.benchmark, algorithm, args.steps, args.warmup, args.top, args.tiny, engine)
               for algorithm in args.algorithm or ["maml"] for engine in args.engine or ["batched"]]
    for result in results:
        result["retain_memory"] = bool(args.retain_memory)
        print(format_profile(result))
        print()
    if args.out:
        out = Path(args.out)
    else:
        out = Path(os.environ.get("OUT") or "results/speed") / f"profile-{args.benchmark}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "profile", "torch": torch.__version__, "results": results}, indent=1)
                   + "\n")
    print(f"wrote {out}")
    return 0
