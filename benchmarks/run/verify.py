"""``metabench verify RECORD``: retrain a record's first steps from its resolved configuration and compare.

Training here is deterministic: batch ``g`` is drawn from ``(seed, g)``, the initialization from the seed, the
evaluation episodes from ``eval_seed``, and the number of processes does not change what a step computes. So the
validation value at a curve point, the random-init baseline and the test-episode digest can be reproduced bit for
bit, on one process, as long as the code, the data, the library versions and the CPU's instruction set are the
same. Where a value differs, the same command can measure the spread that float noise alone gives (the run again
on another inner-loop engine, or another thread count) so that a reader can tell noise from a real difference.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from metabench.datasets.datamodule import EpisodicDataModule
from metabench.models.algorithms import MetaLearner
from metabench.models.hparams import BATCHED_ENGINES
from metabench.models.inner_loop import engine_candidates
from metabench.run.config import ConfigError, RunConfig, build_config
from metabench.run.provenance import data_sha256
from metabench.run.records import Record, git_commit, read_record, versions
from metabench.run.runner import _Clock, _Curve, _prepare, _random_init_baseline, build_datamodule, device_name

# What verify may change (``--set``): where the data is and how the steps execute, never what they compute.
VERIFY_KEYS = ("trainer.cpu_threads", "trainer.accelerator", "data.root", "data.cache_dir", "data.resident",
               "algorithm.engine")
# The training code: a change elsewhere (CLI, leaderboard, reports) cannot change a trained number.
TRAINING_CODE = ("models", "datasets", "benchmarks/presets", "benchmarks/run/runner.py", "benchmarks/run/config.py",
                 "benchmarks/core/distributed.py", "benchmarks/core/stats.py")
# Where training code lived before (records made then name commits that have it there): compared too, so that git
# pairs a moved file with its old self and a move alone is no change (issue 24's layout: benchmarks/*.py).
TRAINING_CODE_BEFORE = ("benchmarks/runner.py", "benchmarks/config.py", "benchmarks/distributed.py",
                        "benchmarks/stats.py")
VERSION_KEYS = ("python", "torch", "lightning", "metabench")
EXIT = {"bit-identical": 0, "different": 1, "cannot verify": 3}  # 2: refused (the CLI's status for bad input)


class VerifyError(ValueError):
    """The record cannot be rebuilt; the message names the missing piece."""


@dataclass(frozen=True)
class Comparison:
    """One recorded quantity against its reproduction (``recorded`` None: the record does not carry it)."""

    name: str
    recorded: float | str | None
    reproduced: float | str

    @property
    def identical(self) -> bool:
        return self.recorded is None or self.recorded == self.reproduced

    def difference(self) -> float | None:
        if isinstance(self.recorded, int | float) and isinstance(self.reproduced, int | float):
            return abs(float(self.recorded) - float(self.reproduced))
        return None

    def line(self, noise: tuple[float, str] | None = None) -> str:
        if self.recorded is None:
            return f"{self.name}: not in the record (older schema); reproduced {_show(self.reproduced)}"
        if self.recorded == self.reproduced:
            return f"{self.name}: bit-identical ({_show(self.reproduced)})"
        delta = self.difference()
        if delta is None:
            return f"{self.name}: different (record {_show(self.recorded)}, reproduced {_show(self.reproduced)})"
        spread = ("" if noise is None else f"; float noise alone, {noise[1]}: {noise[0]:.3g}"
                  f"{', within it' if delta <= noise[0] else ', beyond it'}")
        return (f"{self.name}: different by {delta:.3g} (record {self.recorded!r}, reproduced "
                f"{self.reproduced!r}{spread})")


def _show(value: float | str) -> str:
    return f"{value[:16]}..." if isinstance(value, str) and len(value) == 64 else repr(value)


@dataclass
class Verification:
    """The outcome of :func:`verify`: comparisons, what differs in the making, and the verdict."""

    record: Path
    step: int
    comparisons: list[Comparison]
    differs: list[str]  # code, data, versions, device: each named; why a difference cannot be judged
    ran_as: str
    recorded_as: str
    seconds: float
    noise: tuple[float, str] | None = None  # (|validation difference|, between what) of the same command
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if all(c.identical for c in self.comparisons):
            return "bit-identical"
        return "cannot verify" if self.differs else "different"

    @property
    def exit_status(self) -> int:
        return EXIT[self.verdict]

    def lines(self) -> list[str]:
        out = [f"verify {self.record}: retrained to step {self.step} as {self.ran_as}",
               f"the record's training: {self.recorded_as}"]
        out += [c.line(self.noise if i == 0 else None) for i, c in enumerate(self.comparisons)]
        if self.noise is not None and self.comparisons[0].identical:
            out.append(f"float noise: the same command, {self.noise[1]}, moves the validation value by "
                       f"{self.noise[0]:.3g}")
        out += self.notes
        verdict = self.verdict
        if verdict == "cannot verify":
            verdict += f" ({'; '.join(self.differs)})"
        elif self.differs:
            verdict += f" (although {'; '.join(self.differs)})"
        out.append(f"verdict: {verdict}; {self.seconds:.0f} s")
        return out


def target_step(record: Record, steps: int | None) -> int:
    """The record's first curve point at or after ``steps`` (default: its first point)."""
    if not record.curve:
        raise VerifyError("the record has no validation curve (written before records kept one): nothing to "
                          "retrain towards")
    points = sorted(int(p[0]) for p in record.curve)
    later = [p for p in points if steps is None or p >= steps]
    if not later:
        raise VerifyError(f"--steps {steps} is past the record's last curve point (step {points[-1]})")
    return later[0]


def record_configs(record: Record, overrides: dict[str, Any]) -> tuple[RunConfig, RunConfig]:
    """The configuration the record's run trained with and the one its test used (they differ for a record of
    ``metabench test`` on another protocol), each with ``overrides`` (only :data:`VERIFY_KEYS`)."""
    refused = sorted(set(overrides) - set(VERIFY_KEYS))
    if refused:
        raise VerifyError(f"verify may change only where the data is and how the steps execute "
                          f"({', '.join(VERIFY_KEYS)}), not {', '.join(refused)}")
    tree = {k: v for k, v in record.config.items() if k != "resolved"}
    resolved = record.config.get("resolved", {})
    trained: dict[str, Any] = {}
    if "tested_checkpoint" in resolved or "tested_weights" in resolved:
        if "trained" not in resolved:
            raise VerifyError("this `metabench test` record was written before records named the training run's "
                              "protocol (config.resolved.trained): verify the run's own record instead")
        trained = dict(resolved["trained"])
    # One process: each rank draws the same global meta-batch and keeps its share, so steps do not depend on it.
    execution = {"trainer.devices": 1, "trainer.num_nodes": 1, "trainer.strategy": "auto", "logger": "none",
                 "out_dir": tempfile.gettempdir(), **overrides}
    try:
        return build_config(tree, {**trained, **execution}), build_config(tree, execution)
    except ConfigError as error:
        raise VerifyError(f"cannot rebuild the record's configuration: {error}") from error


def recorded_engine(record: Record) -> str | None:
    """The engine the run's ``auto`` chose (``execution.engine``, or ``config.resolved.engine`` before schema 2)."""
    return record.execution.get("engine") or record.config.get("resolved", {}).get("engine")


def recorded_engine_seconds(record: Record) -> dict[str, float]:
    """The seconds ``auto`` timed each candidate engine for, as the record kept them."""
    return dict(record.config.get("resolved", {}).get("engine_seconds") or {})


def _pin_engine(module: MetaLearner, engine: str | None, timings: dict[str, float] | None = None) -> None:
    # As a resumed run or metabench test does: "auto" takes the recorded choice instead of timing again.
    module.on_load_checkpoint({"metabench_engine": {"engine": engine or "auto", "timings": dict(timings or {})}})


def train_to(config: RunConfig, step: int, engine: str | None, progress: bool = False
             ) -> tuple[float, MetaLearner, EpisodicDataModule, dict[str, torch.Tensor], torch.device]:
    """Train ``config`` as ``metabench run`` does, stop after ``step`` steps; the validation value there.

    The module is built for the configuration's whole ``max_steps`` (learning-rate schedules depend on it);
    validation runs at the run's own cadence (early stopping depends on it) and at ``step``.
    """
    device, datamodule, module, initial = _prepare(config)
    if config.algorithm.engine == "auto":
        if engine is None and engine_candidates(device, module.backbone):
            raise VerifyError("the record does not say which engine `auto` chose (config.resolved.engine)")
        _pin_engine(module, engine)
    every = config.trainer.val_every
    if step % every and getattr(config.algorithm, "patience", None) is not None:
        raise VerifyError(f"step {step} is off the validation cadence (trainer.val_every={every}) that early "
                          f"stopping (algorithm.patience) depends on")
    clock = _Clock()
    curve = _Curve(clock)
    with tempfile.TemporaryDirectory(prefix="metabench-verify-") as root:
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=step,
            val_check_interval=every if step % every == 0 else step, check_val_every_n_epoch=None,
            num_sanity_val_steps=0, logger=False, enable_checkpointing=False, default_root_dir=root,
            callbacks=[clock, curve, *([TQDMProgressBar(refresh_rate=50)] if progress else [])],
            enable_progress_bar=progress, enable_model_summary=False, inference_mode=False, deterministic=False)
        trainer.fit(module, datamodule=datamodule)
    value = next((p[2] for p in curve.points if p[0] == step), None)
    if value is None:
        raise VerifyError(f"training stopped at step {module.global_step} before the curve point at step {step}")
    return value, module, datamodule, initial, device


def verify(record_file: str | Path, steps: int | None = None, overrides: dict[str, Any] | None = None,
           noise: bool = False, progress: bool = False) -> Verification:
    """Retrain ``record_file``'s run to its first curve point at or after ``steps`` and compare the validation
    value, the random-init baseline and the test-episode digest; ``noise`` also runs the same steps on another
    engine (or thread count) to measure the spread float noise alone gives. Raises :class:`VerifyError` for a
    record it cannot rebuild."""
    start = time.perf_counter()
    path = Path(record_file)
    record = read_record(path)
    try:
        step = target_step(record, steps)
        trained, tested = record_configs(record, overrides or {})
        engine = recorded_engine(record)
        value, module, datamodule, initial, device = train_to(trained, step, engine, progress)
    except VerifyError as error:
        raise VerifyError(f"{path}: {error}") from None
    ran_as = _execution_text(1, torch.get_num_threads(), module.engine, device_name(device))
    if tested != trained:  # a record of metabench test: its baseline and digest are of the tested protocol
        datamodule = build_datamodule(tested, device)
    # The engine the record's column adapted with (records before it was named: the device's fallback, "auto").
    column_engine = record.config.get("resolved", {}).get("baseline", {}).get("engine", "auto")
    baseline = _random_init_baseline(tested, datamodule, initial, device, column_engine)["random_init_mean"]
    data = data_sha256(datamodule)
    recorded_value = next(p[2] for p in record.curve if int(p[0]) == step)
    comparisons = [Comparison(f"validation {record.metric} at step {step}", recorded_value, value),
                   Comparison("random-init baseline", record.baseline.get("random_init_mean"), baseline),
                   Comparison("test-episode digest", record.episode_digest, datamodule.digest("test")),
                   Comparison("data sha256", record.data_sha256, data)]
    spread = _noise(trained, step, module.engine, value, device) if noise else None
    return Verification(path, step, comparisons, making_differences(record, data, device_name(device)), ran_as,
                        _recorded_execution(record, step), time.perf_counter() - start, spread)


def _noise(config: RunConfig, step: int, engine: str, value: float, device: torch.device) -> tuple[float, str]:
    """|validation difference| of the same steps on another engine, else on another thread count. The other engine
    is one outside ``engine``'s family where there is one: "batched-fused" and "batched" agree bit for bit to first
    order, so between them a first-order run would show no noise at all."""
    family = BATCHED_ENGINES if engine in BATCHED_ENGINES else (engine,)
    others = sorted((e for e in engine_candidates(device) if e != engine), key=lambda e: e in family)
    if config.algorithm.engine == "auto" and others:
        again, *_ = train_to(config, step, others[0])
        return abs(again - value), f"engine {others[0]} vs {engine}"
    threads = torch.get_num_threads()
    more = 2 if threads == 1 else 1
    try:
        again, *_ = train_to(build_config(config.to_dict(), {"trainer.cpu_threads": more}), step, engine)
    finally:
        torch.set_num_threads(threads)
    return abs(again - value), f"{more} vs {threads} thread(s)"


def _execution_text(processes: int, threads: int, engine: str, device: str) -> str:
    return (f"{processes} process{'es' if processes > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}, "
            f"engine {engine}, {device}")


def _recorded_execution(record: Record, step: int) -> str:
    """How the record's training session that reached ``step`` ran, as far as the record says."""
    sessions = record.execution.get("training") or []
    covering = [s for s in sessions if s[0] < step] or sessions[:1]
    engine = recorded_engine(record) or "?"
    if not covering:
        return (f"engine {engine}, {record.device} (processes and threads of each training session not recorded "
                f"before schema 2)")
    first, processes, threads = covering[-1]
    return f"steps {first}-{step} as " + _execution_text(processes, threads, engine, record.device)


def making_differences(record: Record, data: str, device: str) -> list[str]:
    """What differs between how the record was made and this machine: code, data, versions, device, each named."""
    out = []
    here = versions()
    changed = [f"{key} {record.versions.get(key)} here {here[key]}" for key in VERSION_KEYS
               if record.versions.get(key) != here[key]]
    if changed:
        out.append("versions differ: " + ", ".join(changed))
    if record.data_sha256 is not None and record.data_sha256 != data:
        out.append(f"data differ: the splits read here hash to {data[:12]}..., the record's to "
                   f"{record.data_sha256[:12]}...")
    if record.device.split(" x ")[0] != device.split(" x ")[0]:
        out.append(f"device differs: {record.device.split(' x ')[0]} here {device}")
    code = code_changes(record.git_commit)
    if code:
        out.append(code)
    return out


def code_changes(commit: str | None, repo: Path | None = None) -> str | None:
    """None when the training code here is the record's commit's; else what differs, in words."""
    if commit is None:
        return "code unknown: the record names no git commit"
    base = commit.split("+")[0]
    cwd = repo or Path(__file__).resolve().parents[2]  # the repository: TRAINING_CODE's paths are relative to it
    try:
        # -M: a file moved without a change of content (status R100) is no change; a moved and edited one counts,
        # named by its path here.
        status = subprocess.run(["git", "diff", "-M", "--name-status", base, "--", *TRAINING_CODE,
                                 *TRAINING_CODE_BEFORE], cwd=cwd, capture_output=True, text=True, timeout=30,
                                check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        here = git_commit(cwd)
        return None if here == commit else f"code unknown: commit {base[:10]} is not in this source tree's history"
    if commit.endswith("+dirty"):
        return f"code unknown: the record was made from uncommitted changes on {base[:10]}"
    changed = [line.split("\t")[-1] for line in status if line.strip() and line.split("\t")[0] != "R100"]
    if not changed:
        return None
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return f"code differs: {shown} changed since {base[:10]}"
