"""The random-init column of a test, kept in the run folder so that it is evaluated once per test protocol.

A record's baseline (the same adaptation from the run's own random initialization, on the same episodes) does not
depend on training at all: only on the protocol (what trains the initialization and what tests it), the fixed
episodes, the code and the libraries. For a Reptile test (50 adaptation steps on each of 10,000 episodes) it costs
as much as the test itself, so ``metabench test --baseline-only`` can evaluate it while the run still trains, and
the run's own test and every ``metabench test`` of that protocol reuse it from ``<run dir>/baselines/``.

The file is found by a key over all of that (:func:`baseline_key`): the configuration less the keys that change
nothing computed (execution, citation) and the validation cadence; the episode digest; a digest of the package's
Python sources; the library versions; the device and the inner-loop engine. Any change to one of them evaluates the
baseline anew. A record that reuses one names the file, its commit and its date (``config.resolved.baseline``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import metabench
import metabench.datasets
import metabench.models
from metabench.core.atomic import atomic_write_bytes
from metabench.run.config import EXECUTION_KEYS, VALIDATION_KEYS, RunConfig, flatten_config, training_shape
from metabench.run.records import git_commit, versions

FOLDER = "baselines"
_IGNORED = frozenset({*EXECUTION_KEYS, *VALIDATION_KEYS})


@functools.cache
def source_digest() -> str:
    """sha256 over the path and bytes of every Python source of the installed metabench packages (the code that
    trains an initialization and adapts it)."""
    digest = hashlib.sha256()
    for package in (metabench, metabench.datasets, metabench.models):
        root = Path(package.__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def baseline_key(config: RunConfig, episode_digest: str, device: str, engine: str) -> dict[str, Any]:
    """Everything a random-init baseline's numbers depend on, as stored beside it (``device``: where it is evaluated,
    :func:`metabench.run.runner.device_name`, and ``engine``, the inner-loop engine it adapts with: both round
    differently)."""
    protocol = {key: value for key, value in training_shape(flatten_config(config.to_dict())).items()
                if key not in _IGNORED}
    libraries = {k: v for k, v in versions().items() if k in ("python", "torch", "lightning")}
    return {"protocol": protocol, "episode_digest": episode_digest, "source": source_digest(), "versions": libraries,
            "device": device, "engine": engine}


def _file(run_dir: Path, key: dict[str, Any]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return run_dir / FOLDER / f"{name}.json"


@dataclass(frozen=True)
class KeptBaseline:
    """A baseline read from or written to a run folder."""

    summary: dict[str, float]
    path: Path
    git_commit: str | None
    created: str
    seconds: float

    def provenance(self, reused: bool) -> dict[str, Any]:
        """What a record says about its baseline column (``config.resolved.baseline``)."""
        return {"file": self.path.as_posix(), "reused": reused, "git_commit": self.git_commit,
                "created": self.created, "seconds": self.seconds}


def load_baseline(run_dir: Path, config: RunConfig, episode_digest: str, device: str,
                  engine: str) -> KeptBaseline | None:
    """The baseline kept in ``run_dir`` for exactly this protocol, episodes, code and libraries; None if there is
    none (or the file is not one: it is then evaluated anew and written over)."""
    key = baseline_key(config, episode_digest, device, engine)
    path = _file(run_dir, key)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("key") != json.loads(json.dumps(key, default=str)):  # a hash collision or a hand-edited file
        return None
    return KeptBaseline({k: float(v) for k, v in data["summary"].items()}, path, data.get("git_commit"),
                        data["created"], float(data["seconds"]))


def save_baseline(run_dir: Path, config: RunConfig, episode_digest: str, device: str, engine: str,
                  summary: dict[str, float], seconds: float) -> KeptBaseline:
    """Keep ``summary`` (evaluated in ``seconds``) in ``run_dir`` under this protocol's key (atomically)."""
    key = baseline_key(config, episode_digest, device, engine)
    kept = KeptBaseline(dict(summary), _file(run_dir, key), git_commit(),
                        datetime.now(UTC).isoformat(timespec="seconds"), seconds)
    body = {"key": key, "summary": kept.summary, "git_commit": kept.git_commit, "created": kept.created,
            "seconds": seconds}
    atomic_write_bytes(kept.path, (json.dumps(body, indent=1, default=str) + "\n").encode(), durable=False)
    return kept
