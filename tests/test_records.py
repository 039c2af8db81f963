"""Record validation: one test per rejection, the schema-2 provenance fields, and old records still loading."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from metabench.run.records import SCHEMA_VERSION, Record, RecordError, read_record, write_record

DIGEST = "ab" * 32
RESULTS = Path(__file__).resolve().parent.parent / "results" / "records"
FLAGSHIP = RESULTS / "omniglot-5w1s__maml__20261201T211311Z-ac1f00.json"


def good_record(**changes: Any) -> Record:
    """A valid schema-2 record with hand-derived statistics: scores 0.5, 0.7, 0.9 have mean 0.7, sample standard
    deviation 0.2, so ci95 = 1.96 * 0.2 / sqrt(3)."""
    fields = dict(
        run_id="20260101T000000Z-000000", benchmark="synthetic-5w1s", algorithm="maml", preset="default",
        config={"benchmark": "synthetic-5w1s"}, seed=0, episode_digest=DIGEST, num_episodes=3, metric="accuracy",
        scores=[0.5, 0.7, 0.9], mean=0.7, ci95=1.96 * 0.2 / math.sqrt(3), training_steps=8, train_seconds=1.0,
        eval_seconds=0.5, tasks_per_second=32.0, device="cpu", versions={"torch": "2"}, git_commit=None,
        created="2026-01-01T00:00:00+00:00", baseline={"random_init_mean": 0.2}, curve=[[4, 0.5, 0.3]],
        execution={"engine": "batched", "processes": 1, "threads": 1, "training": [[0, 1, 1], [4, 2, 1]]},
        data_sha256="cd" * 32, weights_sha256="ef" * 32)
    fields.update(changes)
    return Record(**fields)


def test_a_good_record_round_trips(tmp_path: Path) -> None:
    record = good_record()
    record.validate()
    assert read_record(write_record(record, tmp_path)) == record
    assert record.schema_version == SCHEMA_VERSION == 2


def test_committed_version_1_records_still_load() -> None:
    record = read_record(FLAGSHIP)
    assert record.schema_version == 1
    assert record.execution == {} and record.data_sha256 is None and record.weights_sha256 is None
    assert record.curve[0] == [2500, 2246.077, 0.845466673374176]


@pytest.mark.parametrize(("changes", "message"), [
    ({"seed": "0"}, "field 'seed' should be int"),
    ({"mean": True}, "field 'mean' should be int or float"),
    ({"weights_sha256": 5}, "field 'weights_sha256' should be str or NoneType"),
    ({"scores": [0.5, "0.7", 0.9]}, "'scores' holds '0.7', not a number"),
    ({"curve": [[4, 0.5]]}, r"curve point \[4, 0.5\] is not \[step, seconds, value\]"),
])
def test_wrong_types_are_rejected(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(RecordError, match=message):
        good_record(**changes).validate("r.json")


def test_scores_that_disagree_with_the_count_are_rejected() -> None:
    with pytest.raises(RecordError, match="r.json: 3 scores for num_episodes=4"):
        good_record(num_episodes=4).validate("r.json")


def test_scores_that_disagree_with_the_mean_are_rejected() -> None:
    with pytest.raises(RecordError, match=r"mean 0.71 does not match its scores \(0.7"):
        good_record(mean=0.71).validate("r.json")


def test_scores_that_disagree_with_the_ci_are_rejected() -> None:
    with pytest.raises(RecordError, match=r"ci95 0.2 does not match its scores \(0.226"):
        good_record(ci95=0.2).validate("r.json")


@pytest.mark.parametrize("name", ["episode_digest", "data_sha256", "weights_sha256"])
@pytest.mark.parametrize("bad", ["ab" * 31, "AB" * 32, "zz" * 32, "ab" * 32 + " "])
def test_malformed_digests_are_rejected(name: str, bad: str) -> None:
    with pytest.raises(RecordError, match=f"{name} is not a sha256 hex digest"):
        good_record(**{name: bad}).validate("r.json")


@pytest.mark.parametrize(("execution", "message"), [
    ({"engine": "batched", "processes": 1, "threads": 1}, "execution should hold engine, processes, threads"),
    ({"engine": "batched", "processes": 0, "threads": 1, "training": []}, r"execution.processes .* >= 1"),
    ({"engine": 3, "processes": 1, "threads": 1, "training": []}, "execution.engine should be str"),
    ({"engine": "batched", "processes": 1, "threads": 1, "training": [[4, 1, 1], [0, 1, 1]]}, "in step order"),
    ({"engine": "batched", "processes": 1, "threads": 1, "training": [[0, 1]]}, "first step, processes, threads"),
])
def test_malformed_execution_is_rejected(execution: dict[str, Any], message: str) -> None:
    with pytest.raises(RecordError, match=message):
        good_record(execution=execution).validate("r.json")


def test_unknown_and_missing_fields_are_rejected(tmp_path: Path) -> None:
    data = asdict(good_record())
    (tmp_path / "unknown.json").write_text(json.dumps({**data, "weights_sha": DIGEST}))
    with pytest.raises(RecordError, match=r"unknown.json: unknown field\(s\) weights_sha"):
        read_record(tmp_path / "unknown.json")
    del data["scores"]
    (tmp_path / "missing.json").write_text(json.dumps(data))
    with pytest.raises(RecordError, match=r"missing.json: missing field\(s\) scores"):
        read_record(tmp_path / "missing.json")


def test_schema_versions() -> None:
    with pytest.raises(RecordError, match="schema version 3, this metabench reads 1, 2"):
        good_record(schema_version=3).validate()
    version_1 = replace(good_record(), execution={}, data_sha256=None, weights_sha256=None, schema_version=1)
    version_1.validate()  # an old record without the provenance fields
    with pytest.raises(RecordError, match=r"schema version 1 has no field\(s\) weights_sha256 \(new in version 2\)"):
        replace(version_1, weights_sha256=DIGEST).validate()
