"""The random-init column kept in the run folder: evaluated once per protocol, reused bit for bit, evaluated anew
when anything it depends on changes; ``metabench test --baseline-only`` before training ends."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metabench.run.runner as runner
from metabench.run import baselines
from metabench.run.runner import baseline_only, run
from tests.helpers import TINY_RUN, set_flags, tiny_config


def _no_evaluation(*args: object, **kwargs: object) -> dict[str, float]:
    raise AssertionError("the baseline was evaluated again instead of reused")


def test_a_test_reuses_the_runs_baseline_and_a_fresh_one_equals_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from metabench.run.runner import test_run  # not at module level: pytest would collect it

    trained = run(tiny_config(tmp_path, "reptile", steps=4), progress=False)
    made = trained.record.config["resolved"]["baseline"]
    assert made["reused"] is False and Path(made["file"]).parent == trained.run_dir / "baselines"
    assert json.loads(Path(made["file"]).read_text())["summary"] == trained.record.baseline

    with monkeypatch.context() as patch:
        patch.setattr(runner, "_random_init_baseline", _no_evaluation)
        again = test_run(tiny_config(tmp_path, "reptile", steps=4)).record
    assert again.baseline == trained.record.baseline
    kept = again.config["resolved"]["baseline"]
    assert kept["reused"] is True and kept["file"] == made["file"] and kept["created"] == made["created"]

    shutil.rmtree(trained.run_dir / "baselines")  # evaluated anew from the seed: the same numbers
    fresh = test_run(tiny_config(tmp_path, "reptile", steps=4)).record
    assert fresh.baseline == trained.record.baseline and fresh.config["resolved"]["baseline"]["reused"] is False


def test_baseline_only_before_training_then_the_run_reuses_it(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The column needs no trained weights: kept before the run starts, the run's own test takes it, and it is
    what the run evaluates itself (another run folder, same protocol)."""
    engine = ["algorithm.engine=batched"]  # before the run there is no choice of "auto" to read
    early = baseline_only(tiny_config(tmp_path / "a", "maml", steps=4, extra=engine))
    assert early.provenance["reused"] is False and early.num_episodes == 20
    with monkeypatch.context() as patch:
        patch.setattr(runner, "_random_init_baseline", _no_evaluation)
        record = run(tiny_config(tmp_path / "a", "maml", steps=4, extra=engine), progress=False).record
    assert record.baseline == early.summary and record.config["resolved"]["baseline"]["reused"] is True
    itself = run(tiny_config(tmp_path / "b", "maml", steps=4, extra=engine), progress=False).record
    assert itself.baseline == early.summary and itself.config["resolved"]["baseline"]["reused"] is False
    assert baseline_only(tiny_config(tmp_path / "a", "maml", steps=4, extra=engine)).provenance["reused"] is True


def test_the_key_follows_what_the_numbers_depend_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(tmp_path, "fomaml", steps=4)
    first = baseline_only(config).provenance
    # execution keys change nothing computed: the same file
    for extra in (["episodes.eval_batch=3"], ["trainer.cpu_threads=1"], ["data.resident=false"]):
        assert baseline_only(tiny_config(tmp_path, "fomaml", steps=4, extra=extra)).provenance["reused"] is True
    # the test protocol, the seed (the initialization), the engine (rounding), the code and a broken file: anew
    for extra in (["episodes.queries=1"], ["algorithm.eval_steps=3"], ["trainer.seed=1"], ["algorithm.engine=batched"]):
        other = baseline_only(tiny_config(tmp_path, "fomaml", steps=4, extra=extra)).provenance
        assert other["reused"] is False and other["file"] != first["file"]
    monkeypatch.setattr(baselines, "source_digest", lambda: "another version of the code")
    assert baseline_only(config).provenance["reused"] is False
    monkeypatch.undo()
    Path(first["file"]).write_text("{ torn")
    assert baseline_only(config).provenance["reused"] is False
    assert baseline_only(config).provenance["reused"] is True


def test_the_column_adapts_with_the_runs_engine(tmp_path: Path) -> None:
    """Not the device's untimed fallback (the sequential loop on a CPU, 2.4-2.7x slower than the batched engine on
    Reptile's evaluation): the engine the run chose, which --baseline-only reads from the run's checkpoint."""
    early = baseline_only(tiny_config(tmp_path, "reptile", steps=4)).provenance
    assert early["engine"] == "sequential"  # nothing chosen yet: the fallback, and a key of its own
    record = run(tiny_config(tmp_path, "reptile", steps=4), progress=False).record
    chosen = record.config["resolved"]["engine"]
    assert chosen != "auto" and record.config["resolved"]["baseline"]["engine"] == chosen
    assert record.config["resolved"]["baseline"]["reused"] is (chosen == "sequential")
    again = baseline_only(tiny_config(tmp_path, "reptile", steps=4)).provenance
    assert again["engine"] == chosen and again["reused"] is True


def test_several_processes_evaluate_without_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every process must take the same branch of the collective evaluation: a file appearing between two
    # processes' reads would leave one waiting for the other.
    monkeypatch.setattr(runner, "_random_init_baseline", lambda *args: {"random_init_mean": 0.5})
    summary, said = runner.baseline_column(tiny_config(tmp_path, "maml"), None, {}, torch.device("cpu"), tmp_path,
                                           processes=2, engine="batched")
    assert summary == {"random_init_mean": 0.5} and said == {"baseline": {"engine": "batched"}}
    assert not (tmp_path / "baselines").exists()


def _cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "metabench.cli", "test", "--algorithm", "maml", "--out-dir", str(tmp_path / "runs"),
            "--records-dir", str(tmp_path / "records"), "--accelerator", "cpu",
            *set_flags(TINY_RUN + ["trainer.max_steps=4", "algorithm.engine=batched"])]
    return subprocess.run(args + list(extra), capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_cli_baseline_only(tmp_path: Path) -> None:
    out = _cli(tmp_path, "--baseline-only")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "random-init baseline" in out.stdout and "over 20 episodes, evaluated in" in out.stdout
    assert not (tmp_path / "records").exists()  # no trained weights, no record
    again = _cli(tmp_path, "--baseline-only")
    assert "reused (evaluated" in again.stdout
    trained = run(tiny_config(tmp_path, "maml", steps=4, extra=["algorithm.engine=batched"]), progress=False)
    assert trained.record.config["resolved"]["baseline"]["reused"]
    # with a run folder, the test's own checks hold
    out = _cli(tmp_path, "--baseline-only", "--set", "algorithm.inner_lr=0.1")
    assert out.returncode == 2 and "may change only the test protocol" in out.stderr
    weights = _cli(tmp_path, "--baseline-only", "--weights", "w.safetensors")
    assert weights.returncode == 2 and "--baseline-only" in weights.stderr and "Traceback" not in weights.stderr
