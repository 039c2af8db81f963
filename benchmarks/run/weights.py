"""Final weights as ``safetensors`` files (no pickle), named by a sha256 that the run's records carry.

The digest is over the tensors themselves (names, dtypes, shapes and bytes, in name order), not over the file, so
the same weights have the same digest whatever the file's metadata. A run writes ``<run dir>/weights.safetensors``
next to its checkpoint; ``metabench publish RECORD`` copies it to ``results/weights/<record file stem>.safetensors``
after checking it against the record; every load checks the digest again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from metabench.core.atomic import atomic_write_bytes
from metabench.run.records import Record, read_record, record_path

WEIGHTS_FILE = "weights.safetensors"  # in the run folder, next to checkpoints/
FORMAT = "metabench-weights-1"  # the file's metadata "format": what the digest below means


class WeightsError(ValueError):
    """A weights file is unreadable, or its tensors do not match the digest its record names."""


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over ``state``'s tensors in name order: each name, dtype, shape and little-endian bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        header = json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)])
        digest.update(header.encode() + b"\0")
        # A byte view (not .numpy(): bfloat16 has no numpy dtype); safetensors stores the same bytes.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state dict as independent CPU tensors (safetensors refuses shared storage)."""
    return {name: value.detach().to("cpu").clone().contiguous() for name, value in module.state_dict().items()}


def write_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write ``state`` to ``path`` atomically as safetensors; returns its :func:`state_sha256`."""
    sha = state_sha256(state)
    meta = {**(metadata or {}), "format": FORMAT, "sha256": sha}
    atomic_write_bytes(path, save_safetensors(state, metadata=meta))
    return sha


def read_weights(path: str | Path, expected_sha256: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a weights file, refused unless their digest is ``expected_sha256``.

    ``expected_sha256`` None reads without a check (the caller has no record to check against).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise WeightsError(f"{path}: cannot read the weights file ({error.strerror})") from error
    try:
        state = load_safetensors(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as error:
        raise WeightsError(f"{path}: not a safetensors file ({error})") from error
    sha = state_sha256(state)
    if expected_sha256 is not None and sha != expected_sha256:
        raise WeightsError(f"{path}: weights sha256 {sha[:16]}... differs from the record's {expected_sha256[:16]}...: "
                           f"not the weights that record was made with (refused)")
    return state, metadata


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (an 8-byte little-endian header length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8:8 + size]).get("__metadata__") or {})


def run_metadata(record: Record | None = None, **extra: Any) -> dict[str, str]:
    """What a weights file says about itself (strings only, as safetensors metadata must be)."""
    fields = {} if record is None else {"benchmark": record.benchmark, "algorithm": record.algorithm,
                                        "preset": record.preset, "seed": record.seed,
                                        "training_steps": record.training_steps}
    return {key: str(value) for key, value in {**fields, **extra}.items()}


def published_path(weights_dir: str | Path, record: Record) -> Path:
    """``<weights_dir>/<the record's file stem>.safetensors``: one file per record, named by it."""
    return Path(weights_dir) / (record_path("", record).stem + ".safetensors")


def record_of_weights(weights: str | Path, record: str | Path | None = None) -> tuple[Record, Path]:
    """The record a published weights file belongs to: ``record`` if given, else the file of the same stem in the
    ``records`` folder beside the weights' folder (``results/weights/X.safetensors`` -> ``results/records/X.json``).
    """
    weights = Path(weights)
    path = Path(record) if record else weights.parent.parent / "records" / f"{weights.stem}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{weights}: its record {path} does not exist (weights are checked against their "
                                f"record's weights_sha256; pass --record FILE)")
    return read_record(path), path


def publish(record_file: str | Path, run_dir: Path, weights_dir: str | Path) -> Path:
    """Copy ``run_dir``'s weights to ``weights_dir`` under the record's name after checking them against it."""
    record = read_record(record_file)
    if record.weights_sha256 is None:
        raise WeightsError(f"{record_file}: the record has no weights_sha256 (written before metabench recorded "
                           f"weights): run `metabench test` on its run folder for a record that has it")
    source = run_dir / WEIGHTS_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: the run folder of {Path(record_file).name} is not here "
                                f"(pass --out-dir, the folder of the run folders)")
    read_weights(source, record.weights_sha256)
    target = published_path(weights_dir, record)
    atomic_write_bytes(target, source.read_bytes())
    return target


def save_run_weights(run_dir: Path, module: torch.nn.Module, record: Record) -> Path:
    """Write ``module``'s weights to ``<run_dir>/weights.safetensors``; they must be those ``record`` names."""
    path = run_dir / WEIGHTS_FILE
    sha = write_weights(path, module_state(module), run_metadata(record))
    if sha != record.weights_sha256:  # the record was built from the same module: a mismatch is a bug
        raise WeightsError(f"{path}: weights sha256 {sha} differs from the record's {record.weights_sha256}")
    return path
