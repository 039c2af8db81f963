"""``metabench bench speed`` end to end on tiny shapes: it runs every engine and writes valid JSON."""

from __future__ import annotations

import json

import torch

from metabench.cli import main
from metabench.speed import format_table, protocol, run_speed


def test_protocol_reads_the_paper_presets() -> None:
    p = protocol("omniglot-20w1s", "maml")
    assert (p.ways, p.shots, p.queries, p.meta_batch, p.steps, p.first_order) == (20, 1, 1, 16, 5, False)
    r = protocol("mini-imagenet-5w5s", "reptile")
    assert (r.meta_batch, r.steps, r.inner_batch, r.optimizer, r.first_order) == (5, 8, 10, "adam", True)


def test_run_speed_rows_and_ratios() -> None:
    rows = run_speed(["omniglot-5w1s"], ["fomaml", "reptile"], ["batched", "sequential"], torch.device("cpu"),
                     iterations=2, warmup=0, tiny=True, isolate=False, threads=1, log=lambda _line: None)
    assert [(r["algorithm"], r["engine"]) for r in rows] == [
        ("fomaml", "batched"), ("fomaml", "sequential"), ("reptile", "batched"), ("reptile", "sequential")]
    for r in rows:
        assert r["iterations"] == 2 and len(r["step_ms_all"]) == 2
        assert 0 < r["step_ms"] <= r["end_to_end_ms"] + 1e-9
        assert r["flops"] > 0 and r["gflop_per_s"] > 0
        assert abs(r["speedup_vs_sequential"] - rows[[x["engine"] for x in rows].index("sequential")]["step_ms"]
                   / r["step_ms"]) < 1e-9 if r["algorithm"] == "fomaml" else True
    seq = [r for r in rows if r["engine"] == "sequential"]
    assert all(r["speedup_vs_sequential"] == 1.0 for r in seq)
    assert "| omniglot-5w1s" in format_table(rows)


def test_cli_bench_speed_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--tiny", "--protocol", "omniglot-5w1s", "--algorithm", "maml", "--engine",
                 "batched", "--engine", "sequential", "--iterations", "2", "--warmup", "0", "--threads", "1",
                 "--no-isolate", "--accelerator", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "speed" and data["tiny"] is True and len(data["rows"]) == 2
    assert "git_commit" in data
    assert {r["engine"] for r in data["rows"]} == {"batched", "sequential"}
    assert all(r["meta_batch"] == 2 and r["peak_memory_mib"] is not None for r in data["rows"])
    assert "wrote" in capsys.readouterr().out


def test_run_speed_task_chunk_row() -> None:
    rows = run_speed(["omniglot-5w1s"], ["maml", "reptile"], ["batched"], torch.device("cpu"), iterations=1,
                     warmup=0, tiny=True, isolate=False, threads=1, log=lambda _line: None, task_chunk=1)
    assert [(r["algorithm"], r["engine"], r["task_chunk"]) for r in rows] == [
        ("maml", "batched", None), ("maml", "batched/chunk1", 1), ("reptile", "batched", None)]
    assert not rows[1]["fast_path"]
    assert "batched/chunk1" in format_table(rows)
