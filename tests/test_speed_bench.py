"""``metabench bench speed`` / ``bench steps`` on tiny shapes: they time THE module's training step (every
engine, Reptile's own minibatches), write valid JSON, and ``bench steps`` reports the engine ``auto`` picked."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from metabench.cli import main
from metabench.models.algorithms import MAML, Reptile
from metabench.models.inner_loop import engine_candidates
from metabench.perf.speed import format_table, learn2learn_available, machine_gemm_rate, run_speed, speed_config
from metabench.perf.step_time import describe, time_steps

CPU = torch.device("cpu")


def _quiet(_line: str) -> None:
    pass


def test_speed_config_reads_the_paper_presets() -> None:
    c = speed_config("omniglot-20w1s", "maml", "batched")
    a = c.algorithm
    assert (c.episodes.ways, a.meta_batch, a.inner_steps, a.engine) == (20, 16, 5, "batched")
    r = speed_config("mini-imagenet-5w5s", "reptile", "sequential").algorithm
    assert (r.meta_batch, r.inner_steps, r.inner_batch, r.inner_optimizer, r.engine) == (5, 8, 10, "adam",
                                                                                         "sequential")
    t = speed_config("omniglot-5w1s", "reptile", "vmap", tiny=True, task_chunk=1)
    assert (t.model.options["hidden"], t.algorithm.meta_batch, t.algorithm.inner_steps, t.algorithm.inner_batch,
            t.algorithm.task_chunk, t.algorithm.engine) == (4, 2, 2, 4, 1, "vmap")


def test_run_speed_times_the_modules_own_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step of a cell is the module's ``training_step`` under the forced engine; Reptile's inner
    minibatches come from ``Reptile.inner_minibatches`` (seeded by the global step), once per step."""
    calls: Counter[tuple[str, str]] = Counter()

    def counting(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            calls[(f"{self.config.name}.{name}", self.engine)] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    counting(MAML, "training_step")
    counting(Reptile, "training_step")
    counting(Reptile, "inner_minibatches")
    rows = run_speed(["omniglot-5w1s"], ["fomaml", "reptile"], ["batched", "sequential"], CPU, iterations=2,
                     warmup=1, tiny=True, isolate=False, threads=1, log=_quiet)
    assert [(r["algorithm"], r["engine"], r["module_engine"]) for r in rows] == [
        ("fomaml", "batched", "batched"), ("fomaml", "sequential", "sequential"),
        ("reptile", "batched", "batched"), ("reptile", "sequential", "sequential")]
    # memory step + 1 warmup + 2 timed (+ 1 FLOP-counted step for the batched engine)
    assert calls == {("fomaml.training_step", "batched"): 5, ("fomaml.training_step", "sequential"): 4,
                     ("reptile.training_step", "batched"): 5, ("reptile.training_step", "sequential"): 4,
                     ("reptile.inner_minibatches", "batched"): 5, ("reptile.inner_minibatches", "sequential"): 4}
    for r in rows:
        assert r["iterations"] == 2 and len(r["step_ms_all"]) == 2
        assert 0 < r["step_ms"] <= r["end_to_end_ms"] + 1e-9
        assert r["flops"] > 0 and r["gflop_per_s"] > 0 and r["flops_engine"] == "batched"
        assert r["gemm_gflop_per_s"] > 0
        assert r["gemm_fraction"] == pytest.approx(r["gflop_per_s"] / machine_gemm_rate(rows))
        assert r["shots"] == (10 if r["algorithm"] == "reptile" else 1)  # the preset's train_shots, via the split
    seq = {r["algorithm"]: r for r in rows if r["engine"] == "sequential"}
    for r in rows:
        assert r["speedup_vs_sequential"] == pytest.approx(seq[r["algorithm"]]["step_ms"] / r["step_ms"])
    assert sum(r["fast_path"] for r in rows) == 2 and "| omniglot-5w1s" in format_table(rows)


def test_run_speed_flop_count_does_not_depend_on_the_engine() -> None:
    """The same FOMAML training step counted on each engine alone: one FLOP count (metabench.perf.flops), so FLOP/s and
    the fraction of the GEMM rate compare across rows and runs."""
    counts = {engine: run_speed(["omniglot-5w1s"], ["fomaml"], [engine], CPU, iterations=1, warmup=0, tiny=True,
                                isolate=False, threads=1, log=_quiet)[0]["flops"]
              for engine in ("batched-fused", "batched", "sequential")}
    assert counts["batched-fused"] == counts["batched"] == counts["sequential"] > 0


def test_run_speed_retain_memory_in_the_cells_process() -> None:
    row = run_speed(["omniglot-5w1s"], ["fomaml"], ["batched"], CPU, iterations=1, warmup=0, tiny=True, isolate=True,
                    threads=1, log=_quiet, retain_memory=True)[0]
    assert row["retain_memory"] is True and row["step_ms"] > 0


def test_cli_bench_speed_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--tiny", "--protocol", "omniglot-5w1s", "--algorithm", "maml", "--engine",
                 "batched", "--engine", "sequential", "--iterations", "2", "--warmup", "0", "--threads", "1",
                 "--no-isolate", "--accelerator", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "speed" and data["tiny"] is True and len(data["rows"]) == 2
    assert "git_commit" in data and data["gemm"]["gflop_per_s"] == machine_gemm_rate(data["rows"]) > 0
    assert "% GEMM" in data["table"] and all(r["gemm_fraction"] > 0 for r in data["rows"])
    assert {r["engine"] for r in data["rows"]} == {"batched", "sequential"}
    assert all(r["meta_batch"] == 2 and r["peak_memory_mib"] is not None for r in data["rows"])
    assert "wrote" in capsys.readouterr().out


def test_run_speed_task_chunk_row(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks: list[int | None] = []
    original = MAML.training_step

    def recording(self, *args, **kwargs):
        chunks.append(self.config.task_chunk)  # the chunked row runs the module's manual-optimization path
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MAML, "training_step", recording)
    rows = run_speed(["omniglot-5w1s"], ["maml", "reptile"], ["batched"], CPU, iterations=1, warmup=0, tiny=True,
                     isolate=False, threads=1, log=_quiet, task_chunk=1)
    assert [(r["algorithm"], r["engine"], r["task_chunk"]) for r in rows] == [
        ("maml", "batched", None), ("maml", "batched/chunk1", 1), ("reptile", "batched", None)]
    assert chunks == [None] * 3 + [1] * 2  # memory, timed, FLOPs steps; then memory, timed
    assert not rows[1]["fast_path"]
    assert "batched/chunk1" in format_table(rows)


def test_run_speed_auto_and_learn2learn_rows() -> None:
    engines = ["auto"] + (["learn2learn"] if learn2learn_available() else [])
    rows = run_speed(["omniglot-5w1s"], ["maml"], engines, CPU, iterations=1, warmup=0, tiny=True, isolate=False,
                     threads=1, log=_quiet)
    auto = rows[0]
    assert auto["module_engine"] in engine_candidates(CPU) and set(auto["engine_timings"]) == set(
        engine_candidates(CPU))
    if len(rows) == 2:
        assert rows[1]["engine"] == "learn2learn" and rows[1]["speedup_vs_learn2learn"] == 1.0
    with pytest.raises(ValueError, match="unknown engine"):
        run_speed(["omniglot-5w1s"], ["maml"], ["fast"], CPU, iterations=1, warmup=0, tiny=True, isolate=False)


def test_time_steps_reports_the_engine_auto_picked() -> None:
    row = time_steps("synthetic-5w1s", "maml", None, steps=1, warmup=0, accelerator="cpu")
    assert row["configured_engine"] == "auto" and row["warmup"] == 1  # the probe step is never timed
    assert set(row["engine_timings"]) == set(engine_candidates(CPU))
    assert row["engine"] == min(row["engine_timings"], key=row["engine_timings"].get)
    assert row["steps_timed"] == 1 and f"engine {row['engine']} (auto; first step:" in describe(row)


def test_scaling_layouts_and_table() -> None:
    from metabench.perf.scaling import parse_layout, table

    assert parse_layout("2x1") == (2, 1) and parse_layout(" 1 x 2 ") == (1, 2)
    for bad in ("2", "0x1", "2x0", "axb"):
        with pytest.raises(ValueError, match="PROCESSESxTHREADS"):
            parse_layout(bad)
    rows = [{"algorithm": "maml", "processes": p, "threads": t, "engine": "batched", "median_s": s}
            for p, t, s in ((1, 1, 0.4), (1, 2, 0.5), (2, 1, 0.25))]
    lines = table(rows).splitlines()
    assert lines[2] == "| maml | 1 x 1 | batched | 400 | 1.00x |"
    assert lines[3].endswith("| 500 | 0.80x |") and lines[4].endswith("| 250 | 1.60x |")
