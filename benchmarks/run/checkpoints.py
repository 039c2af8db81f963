"""Checkpoints that survive any stop: atomic writes, the previous checkpoint kept, resume from the newest readable
one, and one line (not a traceback) when a process of a several-process run is lost.

A kill during a write leaves either the old ``last.ckpt`` or the new one (a temporary file in the same folder is
renamed over it); the checkpoint it replaces stays as ``last.prev.ckpt``. ``--resume`` takes the newest of the two
that loads, and says so in one line when it had to fall back.
"""

from __future__ import annotations

import io
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from metabench.core.atomic import atomic_write_bytes

LAST = "last.ckpt"
PREVIOUS = "last.prev.ckpt"


class KeepPreviousCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic and keeping the checkpoint it replaces (``last.prev.ckpt`` beside
    ``last.ckpt``): a checkpoint cut short by a kill never costs the run."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialised before anything on disk changes
        if path.exists():
            os.replace(path, path.with_name(PREVIOUS if path.name == LAST else f"{path.stem}.prev{path.suffix}"))
        atomic_write_bytes(path, buffer.getvalue(), durable=False)


class NoCheckpointError(RuntimeError):
    """A run folder holds checkpoints, none of them readable."""


@dataclass(frozen=True)
class Resumable:
    """The checkpoint ``--resume`` continues from: its path, its training step, and the line saying why it is not
    ``last.ckpt`` (None when it is)."""

    path: Path
    step: int
    note: str | None = None


def readable_checkpoint(ckpt_dir: Path) -> Resumable | None:
    """The newest checkpoint of ``ckpt_dir`` that loads: ``last.ckpt``, else ``last.prev.ckpt``; None when there is
    none at all.

    Raises:
        NoCheckpointError: checkpoints exist but none loads (each one's error named).
    """
    problems = []
    for name in (LAST, PREVIOUS):
        path = ckpt_dir / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
        except Exception as error:  # noqa: BLE001 - any unreadable file is a reason to fall back, named below
            problems.append(f"{name}: unreadable ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
            continue
        note = None if name == LAST else f"metabench: {'; '.join(problems)}: resuming from {name} (step {step})"
        return Resumable(path, step, note)
    if all(p.endswith("missing") for p in problems):
        return None
    raise NoCheckpointError(f"no readable checkpoint in {ckpt_dir} ({'; '.join(problems)}): remove the folder to "
                            "start the run afresh")


class LostProcessError(RuntimeError):
    """A process of a several-process (DDP) run stopped; the message is the one line to show."""


# Errors a collective raises when a peer process is gone (gloo: "Connection closed by peer", "Connection reset by
# peer"; NCCL: "remote process exited").
_PEER_GONE = ("connection closed", "connection reset", "broken pipe", "remote process", "gloo", "nccl")


def lost_process(error: BaseException, trainer: Any, step: int) -> LostProcessError | None:
    """The one-line :class:`LostProcessError` for ``error`` when it is a collective failing because another process
    of ``trainer``'s run stopped; None for any other error (or a one-process run)."""
    if trainer.world_size <= 1:
        return None
    text = str(error).lower()
    if not (isinstance(error, torch.distributed.DistError) or
            (isinstance(error, RuntimeError) and any(k in text for k in _PEER_GONE))):
        return None
    who = "another process"
    procs = getattr(trainer.strategy.launcher, "procs", None) or []
    deadline = time.monotonic() + 2.0  # the dead child may not have been reaped yet
    while procs and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    dead = [(rank, p) for rank, p in enumerate(procs, start=1) if p.poll() is not None]
    if dead:
        rank, proc = dead[0]
        code = proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        who = f"rank {rank} (pid {proc.pid}, {how})"
    elif trainer.global_rank > 0:
        who = "rank 0" if os.getppid() == 1 else "another process"
    args = [a for a in sys.argv[1:] if a != "--resume"]
    command = shlex.join(["metabench", *args, "--resume"])
    return LostProcessError(f"metabench: {who} of this {trainer.world_size}-process run stopped at step {step}; "
                            f"the last checkpoint is kept. Resume with: {command}")
