"""``metabench test --weights FILE``: evaluate published weights on any test protocol, without the run folder.

The weights file is checked against its record's ``weights_sha256``; the record gives the training configuration
(the network to build, the seed of the random-init baseline). With the record's own protocol the evaluation must
reproduce the record's scores (and is compared, not written again); with another protocol (``--set
episodes.queries=1``, ...) it writes a new record, as ``metabench test`` does for a run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metabench.run.config import EXECUTION_KEYS, TRAIN_SHAPE, VALIDATION_KEYS, RunConfig, build_config
from metabench.run.provenance import protocol_changes
from metabench.run.records import Record, write_record
from metabench.run.runner import _prepare, _test_record, _test_trainer, check_test_overrides, with_training_shape
from metabench.run.verify import _pin_engine, recorded_engine, recorded_engine_seconds
from metabench.run.weights import read_weights, record_of_weights


@dataclass
class WeightsTest:
    """The new record, the record the weights belong to, and where the new one was written (None: not written)."""

    record: Record
    source: Record
    source_path: Path
    path: Path | None

    @property
    def same_protocol(self) -> bool:
        return self.path is None

    def reproduces(self) -> bool:
        """Every per-episode score, the mean and the digest equal the source record's, bit for bit."""
        return (self.record.scores == self.source.scores and self.record.episode_digest == self.source.episode_digest
                and self.record.mean == self.source.mean)


def weights_config(source: Record, overrides: dict[str, Any]) -> RunConfig:
    """The source record's configuration with test-protocol ``overrides`` (anything else is refused)."""
    tree = {k: v for k, v in source.config.items() if k != "resolved"}
    # A run folder's execution (processes) is not part of an evaluation: one process evaluates the weights.
    tested = build_config(tree, {"trainer.devices": 1, "trainer.num_nodes": 1, "trainer.strategy": "auto",
                                 **overrides})
    tested = with_training_shape(tested, tree)
    check_test_overrides(tree, tested)
    return tested


def test_weights(weights: str | Path, overrides: dict[str, Any] | None = None, record: str | Path | None = None,
                 write: bool = True) -> WeightsTest:
    """Evaluate the published ``weights`` (checked against their record) on the record's test protocol changed
    by ``overrides`` (test-protocol keys and paths only)."""
    source, source_path = record_of_weights(weights, record)
    if source.weights_sha256 is None:
        raise ValueError(f"{source_path}: the record has no weights_sha256: its weights cannot be checked")
    state, _ = read_weights(weights, source.weights_sha256)
    config = weights_config(source, overrides or {})
    device, datamodule, module, initial = _prepare(config)
    module.load_state_dict(state)
    _pin_engine(module, recorded_engine(source), recorded_engine_seconds(source))
    resolved = {"tested_weights": {"path": Path(weights).as_posix(), "record": source_path.name},
                "trained": _trained_values(source, config)}
    result = _test_record(config, _test_trainer(device), module, datamodule, device, initial,
                          steps=source.training_steps, train_seconds=source.train_seconds, curve=source.curve,
                          resolved=resolved, sessions=source.execution.get("training", []))
    same = _protocol(result) == _protocol(source)
    path = None if same or not write else write_record(result, config.records_dir)
    return WeightsTest(result, source, source_path, path)


def _protocol(record: Record) -> dict[str, Any]:
    """What a record's scores depend on besides the weights: its configuration less the keys that change nothing
    computed (paths, execution, citations) and the training run's validation cadence."""
    tree = build_config({k: v for k, v in record.config.items() if k != "resolved"}).to_dict()
    for dotted in (*EXECUTION_KEYS, *VALIDATION_KEYS):
        *sections, key = dotted.split(".")
        node = tree
        for section in sections:
            node = node[section]
        node.pop(key)
    for key in TRAIN_SHAPE:  # as training used them: metabench test writes the training shape out explicitly
        tree["episodes"][f"train_{key}"] = tree["episodes"][f"train_{key}"] or tree["episodes"][key]
    return tree


def _trained_values(source: Record, tested: RunConfig) -> dict[str, Any]:
    """The training run's values where ``tested`` changes the protocol (as ``metabench test`` records them)."""
    resolved = source.config.get("resolved", {})
    trained = build_config({k: v for k, v in source.config.items() if k != "resolved"}, resolved.get("trained", {}))
    return protocol_changes(trained, tested)
