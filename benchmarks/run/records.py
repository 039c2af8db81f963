"""Run records: one JSON per finished evaluation, validated on write and on read, written atomically.

A record is the unit the leaderboard reads: what ran (benchmark, algorithm, full resolved config, seed),
on which test set (episode digest, number of episodes), what came out (per-episode scores, mean, 95% CI)
and where (device, versions, git commit). Since schema version 2 it also says how the run executed (engine,
processes, threads), which data it read (sha256 of the prepared splits) and what it produced (sha256 of the
final weights), so that ``metabench verify`` can re-check it and published weights can be checked against it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import metabench
from metabench.core.atomic import atomic_write_bytes
from metabench.core.stats import mean_ci95

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)  # version 1: before the provenance fields (execution, data and weights sha256)
V2_FIELDS = ("execution", "data_sha256", "weights_sha256")
EXECUTION_FIELDS = ("engine", "processes", "threads", "training")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RecordError(ValueError):
    """A record file is malformed or does not match the schema; the message names the file and field."""


@dataclass
class Record:
    """One finished evaluation. ``mean`` and ``ci95`` (1.96 * sample std / sqrt(n)) are over ``scores``."""

    run_id: str
    benchmark: str
    algorithm: str
    preset: str
    config: dict[str, Any]
    seed: int
    episode_digest: str
    num_episodes: int
    metric: str
    scores: list[float]
    mean: float
    ci95: float
    training_steps: int
    train_seconds: float
    eval_seconds: float
    tasks_per_second: float
    device: str
    versions: dict[str, str]
    git_commit: str | None
    created: str
    baseline: dict[str, float] = field(default_factory=dict)  # e.g. random init + the same adaptation
    # Further summary metrics of the same test episodes, e.g. {"miou": 0.41, "fb_iou": 0.62} for segmentation.
    metrics: dict[str, float] = field(default_factory=dict)
    # Validation curve: [[training step, training seconds so far, validation mean], ...] in step order.
    curve: list[list[float]] = field(default_factory=list)
    # How this record's evaluation ran: {"engine": the inner-loop engine ("auto"'s choice), "processes", "threads"
    # (torch intra-op threads per process), "training": [[first step, processes, threads], ...] one entry per
    # training session (a resume starts a new one; [] when the checkpoint did not say)}. Empty before schema 2.
    execution: dict[str, Any] = field(default_factory=dict)
    data_sha256: str | None = None  # the prepared splits read (metabench.run.provenance.data_sha256)
    weights_sha256: str | None = None  # the final weights (metabench.run.weights.state_sha256)
    schema_version: int = SCHEMA_VERSION

    def validate(self, where: str = "record") -> None:
        """Check types and internal consistency; raise :class:`RecordError` naming ``where`` and the field."""
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _TYPES[f.name]
            if not isinstance(value, expected) or (isinstance(value, bool) and bool not in _as_tuple(expected)):
                raise RecordError(f"{where}: field {f.name!r} should be {_type_name(expected)}, got {value!r:.80}")
        if self.schema_version not in READABLE_SCHEMA_VERSIONS:
            raise RecordError(f"{where}: schema version {self.schema_version}, this metabench reads "
                              f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}")
        if self.schema_version < 2:
            carried = [name for name in V2_FIELDS if getattr(self, name) not in (None, {})]
            if carried:
                raise RecordError(f"{where}: schema version {self.schema_version} has no field(s) {', '.join(carried)} "
                                  f"(new in version 2)")
        for name in ("episode_digest", "data_sha256", "weights_sha256"):
            value = getattr(self, name)
            if value is not None and not _SHA256.fullmatch(value):
                raise RecordError(f"{where}: {name} is not a sha256 hex digest (64 lowercase hex digits): "
                                  f"{value!r:.80}")
        _check_numbers(where, "scores", self.scores)
        _check_numbers(where, "baseline", list(self.baseline.values()))
        _check_numbers(where, "metrics", list(self.metrics.values()))
        for point in self.curve:
            if not isinstance(point, list) or len(point) != 3:
                raise RecordError(f"{where}: curve point {point!r:.80} is not [step, seconds, value]")
            _check_numbers(where, "curve", point)
        _check_execution(where, self.execution)
        if len(self.scores) != self.num_episodes:
            raise RecordError(f"{where}: {len(self.scores)} scores for num_episodes={self.num_episodes}")
        if self.scores:
            mean, ci = mean_ci95(self.scores)
            if not math.isclose(mean, self.mean, rel_tol=1e-9, abs_tol=1e-12):
                raise RecordError(f"{where}: mean {self.mean} does not match its scores ({mean})")
            if not (math.isnan(ci) and math.isnan(self.ci95)) and not math.isclose(ci, self.ci95, rel_tol=1e-9,
                                                                                     abs_tol=1e-12):
                raise RecordError(f"{where}: ci95 {self.ci95} does not match its scores ({ci})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


_TYPES: dict[str, Any] = {
    "run_id": str, "benchmark": str, "algorithm": str, "preset": str, "config": dict, "seed": int,
    "episode_digest": str, "num_episodes": int, "metric": str, "scores": list, "mean": (int, float),
    "ci95": (int, float), "training_steps": int, "train_seconds": (int, float), "eval_seconds": (int, float),
    "tasks_per_second": (int, float), "device": str, "versions": dict, "git_commit": (str, type(None)),
    "created": str, "baseline": dict, "metrics": dict, "curve": list, "execution": dict,
    "data_sha256": (str, type(None)), "weights_sha256": (str, type(None)), "schema_version": int,
}


# Fields a record may omit (defaults apply): records written before they existed still load.
_OPTIONAL = ("baseline", "metrics", "curve", *V2_FIELDS, "schema_version")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_numbers(where: str, name: str, values: list[Any]) -> None:
    bad = next((v for v in values if not _is_number(v)), None)
    if bad is not None:
        raise RecordError(f"{where}: field {name!r} holds {bad!r:.40}, not a number")


def _check_execution(where: str, execution: dict[str, Any]) -> None:
    """``execution`` is empty (records before schema 2) or holds exactly :data:`EXECUTION_FIELDS`, typed."""
    if not execution:
        return
    if set(execution) != set(EXECUTION_FIELDS):
        raise RecordError(f"{where}: execution should hold {', '.join(EXECUTION_FIELDS)}, got "
                          f"{', '.join(sorted(execution))}")
    if not isinstance(execution["engine"], str):
        raise RecordError(f"{where}: execution.engine should be str, got {execution['engine']!r:.40}")
    for key in ("processes", "threads"):
        value = execution[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RecordError(f"{where}: execution.{key} should be an integer >= 1, got {value!r:.40}")
    training = execution["training"]
    ok = isinstance(training, list) and all(
        isinstance(s, list) and len(s) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in s)
        for s in training)
    if not ok or any(later[0] < earlier[0] for earlier, later in zip(training, training[1:])):
        raise RecordError(f"{where}: execution.training should be [[first step, processes, threads], ...] in step "
                          f"order, got {training!r:.80}")


def _as_tuple(t: Any) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _type_name(t: Any) -> str:
    return " or ".join(x.__name__ for x in _as_tuple(t))


def record_path(records_dir: str | Path, record: Record) -> Path:
    return Path(records_dir) / f"{record.benchmark}__{record.algorithm}__{record.run_id}.json"


def write_record(record: Record, records_dir: str | Path) -> Path:
    """Validate ``record`` and write it atomically; returns its path."""
    path = record_path(records_dir, record)
    record.validate(str(path))
    atomic_write_bytes(path, (record.to_json() + "\n").encode())
    return path


def read_record(path: str | Path) -> Record:
    """Read and validate one record file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: not readable as JSON ({error})") from error
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected a JSON object")
    names = {f.name for f in fields(Record)}
    missing = sorted(n for n in names - set(data) if n not in _OPTIONAL)
    if missing:
        raise RecordError(f"{path}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecordError(f"{path}: unknown field(s) {', '.join(unknown)}")
    record = Record(**data)
    record.validate(str(path))
    return record


def git_commit(repo: Path | None = None) -> str | None:
    """The current commit of the source tree (with ``+dirty`` if it has uncommitted changes).

    Where the tree is a copy without ``.git`` (e.g. a lent GPU machine), ``$METABENCH_GIT_COMMIT`` names the
    commit the copy was made from (recorded as given, suffixed ``+declared``); None if neither is known.
    """
    cwd = repo or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        declared = os.environ.get("METABENCH_GIT_COMMIT", "").strip()
        return f"{declared}+declared" if declared else None
    return commit + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    import lightning
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "metabench": metabench.__version__, "platform": platform.platform()}
