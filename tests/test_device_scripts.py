"""The lent-GPU scripts in scripts/device/: staging a large file over several calls, and reproduce.sh's path
(install check, train, record to $OUT, resume after a cut) on a tiny synthetic run on the CPU."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, set_flags

STAGE = REPO / "scripts" / "device" / "stage.sh"
REPRODUCE = REPO / "scripts" / "device" / "reproduce.sh"


def _bash(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)


def test_stage_split_and_join_over_several_calls(tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 123)  # 3 MiB + a bit -> 4 parts of 1 MiB
    big = tmp_path / "images.zip"
    big.write_bytes(payload)
    parts = tmp_path / "parts"
    assert _bash(STAGE, "split", big, parts, "1").returncode == 0
    names = sorted(p.name for p in parts.iterdir())
    assert names == ["images.zip.part-000", "images.zip.part-001", "images.zip.part-002", "images.zip.part-003",
                     "images.zip.sha256"]
    dest = tmp_path / "dest"
    # Each "call" carries the checksum file and two parts, as a 64 MiB carry would hold two 28 MiB parts.
    for i, batch in enumerate((names[0:2], names[2:4])):
        carried = tmp_path / f"carry{i}"
        carried.mkdir()
        for name in [*batch, "images.zip.sha256"]:
            (carried / name).write_bytes((parts / name).read_bytes())
        result = _bash(STAGE, "join", carried, dest)
        if i == 0:
            assert result.returncode == 75 and "2 of 4 part(s)" in result.stdout
            assert not (dest / "images.zip").exists()
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256((dest / "images.zip").read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert not list((dest / ".parts").glob("*.part-*"))  # parts removed once assembled
    assert _bash(STAGE, "join", carried, dest).returncode == 0  # idempotent


def test_stage_join_rejects_a_damaged_part(tmp_path: Path) -> None:
    big = tmp_path / "data.bin"
    big.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    parts = tmp_path / "parts"
    _bash(STAGE, "split", big, parts, "1")
    damaged = parts / "data.bin.part-001"
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    result = _bash(STAGE, "join", parts, tmp_path / "dest")
    assert result.returncode == 1 and "does not match" in result.stderr
    assert not (tmp_path / "dest" / "data.bin").exists()


def test_stage_usage_errors(tmp_path: Path) -> None:
    assert _bash(STAGE).returncode == 2
    result = _bash(STAGE, "split", tmp_path / "missing.zip", tmp_path / "p")
    assert result.returncode == 2 and "no such file" in result.stderr


def _reproduce_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHON=sys.executable, DATA_DIR=str(tmp_path / "data"), STATE_DIR=str(tmp_path / "state"),
               OUT=str(tmp_path / "out"), WHEELS=str(tmp_path / "no-wheels"), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", **extra)
    return env


def test_reproduce_usage_and_missing_data(tmp_path: Path) -> None:
    assert _bash(REPRODUCE, env=_reproduce_env(tmp_path)).returncode == 2
    result = _bash(REPRODUCE, "synthetic-5w1s", "maml", env=_reproduce_env(tmp_path))
    assert result.returncode == 2 and "data folder" in result.stderr


@pytest.mark.slow
def test_reproduce_trains_resumes_and_writes_the_record_to_out(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    args = ["synthetic-5w1s", "maml", "--test-episodes", "20", *set_flags([
        "trainer.cpu_threads=1", "trainer.checkpoint_every=2", "algorithm.meta_batch=2", "episodes.val_episodes=5",
        "trainer.val_every=4"])]
    env = _reproduce_env(tmp_path, MAX_STEPS="6", COMMIT="0123abc")
    first = _bash(REPRODUCE, *args, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    records = list((tmp_path / "out" / "records").glob("synthetic-5w1s__maml__*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["training_steps"] == 6 and record["num_episodes"] == 20
    assert (tmp_path / "out" / "metrics.csv").is_file()
    # A second call with more steps resumes the kept checkpoint instead of starting over.
    env["MAX_STEPS"] = "8"
    second = _bash(REPRODUCE, *args, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    newest = max((tmp_path / "out" / "records").glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert json.loads(newest.read_text())["training_steps"] == 8
    assert "Restoring states from the checkpoint" in second.stdout + second.stderr or \
        json.loads(newest.read_text())["train_seconds"] > record["train_seconds"]
