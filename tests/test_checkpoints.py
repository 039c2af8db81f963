"""Runs that survive any stop: atomic checkpoints with the previous one kept, ``--resume`` from the newest readable
checkpoint, and one line (not a traceback) when a process of a DDP run dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metabench.run.checkpoints import KeepPreviousCheckpointIO, NoCheckpointError, readable_checkpoint
from tests.helpers import TINY_RUN, set_flags


def _save(io: KeepPreviousCheckpointIO, path: Path, step: int) -> None:
    io.save_checkpoint({"global_step": step, "state_dict": {"w": torch.full((3,), float(step))}}, path)


def test_each_save_keeps_the_checkpoint_it_replaces(tmp_path: Path) -> None:
    io = KeepPreviousCheckpointIO()
    last = tmp_path / "last.ckpt"
    _save(io, last, 2)
    assert not (tmp_path / "last.prev.ckpt").exists()
    _save(io, last, 4)
    _save(io, last, 6)
    assert torch.load(last, weights_only=False)["global_step"] == 6
    assert torch.load(tmp_path / "last.prev.ckpt", weights_only=False)["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]  # no temporary left
    found = readable_checkpoint(tmp_path)
    assert found is not None and (found.path.name, found.step, found.note) == ("last.ckpt", 6, None)


def test_a_torn_last_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    io = KeepPreviousCheckpointIO()
    last = tmp_path / "last.ckpt"
    _save(io, last, 4)
    _save(io, last, 6)
    last.write_bytes(last.read_bytes()[:100])  # what a kill in the middle of a plain write leaves
    found = readable_checkpoint(tmp_path)
    assert found is not None and (found.path.name, found.step) == ("last.prev.ckpt", 4)
    assert found.note is not None and found.note.startswith("metabench: last.ckpt: unreadable (")
    assert found.note.endswith("resuming from last.prev.ckpt (step 4)") and "\n" not in found.note
    last.unlink()  # killed between moving the old one aside and writing the new one
    found = readable_checkpoint(tmp_path)
    assert found is not None and found.step == 4 and "last.ckpt: missing" in (found.note or "")


def test_no_readable_checkpoint_names_each_problem(tmp_path: Path) -> None:
    assert readable_checkpoint(tmp_path) is None  # nothing at all: a fresh run
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(NoCheckpointError, match=r"last.ckpt: unreadable .*last.prev.ckpt: missing.*start the run"):
        readable_checkpoint(tmp_path)


def _cli(out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "metabench.cli", "run", "--algorithm", "fomaml", "--quiet", "--accelerator", "cpu",
            "--out-dir", str(out), "--records-dir", str(out / "records"), "--max-steps", str(steps),
            *set_flags(TINY_RUN), "--set", "algorithm.engine=sequential", *extra]


def _ckpt_dir(out: Path) -> Path:
    return out / "synthetic-5w1s" / "fomaml-default-seed0" / "checkpoints"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_resume_falls_back_with_one_line_and_says_where_it_continued(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = subprocess.run(_cli(out, 8), capture_output=True, text=True, timeout=900, env=_env())
    assert first.returncode == 0, first.stderr[-2000:]
    last = _ckpt_dir(out) / "last.ckpt"
    prev_step = int(torch.load(_ckpt_dir(out) / "last.prev.ckpt", weights_only=False)["global_step"])
    last.write_bytes(last.read_bytes()[:1000])
    resumed = subprocess.run(_cli(out, 12, "--resume"), capture_output=True, text=True, timeout=900, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = [line for line in resumed.stderr.splitlines() if "last.prev.ckpt" in line]
    assert lines == [f"metabench: last.ckpt: unreadable ({lines[0].split('(', 1)[1].split(')')[0]}): resuming from "
                     f"last.prev.ckpt (step {prev_step})"]
    assert "Traceback" not in resumed.stderr
    (record,) = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")
                 if json.loads(p.read_text())["training_steps"] == 12]
    assert record["config"]["resolved"]["resumed_from"] == {"checkpoint": "last.prev.ckpt", "step": prev_step}


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the DDP child process through /proc")
def test_a_killed_ddp_process_ends_the_run_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    args = _cli(out, 400, "--set", "episodes.eval_batch=5", "--devices", "2", "--strategy", "ddp", "--set",
                "trainer.checkpoint_every=2")
    victim = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    ckpt = _ckpt_dir(out) / "last.ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None and not (ckpt.exists() and _children(victim.pid)):
        time.sleep(0.2)
    assert victim.poll() is None, "the run ended before a checkpoint: " + (victim.stderr.read()[-2000:])
    rank1 = [pid for pid in _children(victim.pid) if "metabench" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    stderr = victim.communicate(timeout=300)[1]
    assert victim.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [s for s in stderr.splitlines() if s.startswith("metabench:")]
    assert line.startswith(f"metabench: rank 1 (pid {rank1[0]}, killed by SIGKILL) of this 2-process run stopped")
    assert line.endswith("--strategy ddp --set trainer.checkpoint_every=2 --resume")
