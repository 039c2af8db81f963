"""Config key roles (metabench.core.roles): declared once, on the fields; what grid and metabench test ignore is
derived from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from metabench.core.roles import EXECUTION, ROLES, TRAINING, role_field, roles
from metabench.run.config import (
    EXECUTION_KEYS,
    TEST_KEYS,
    TEST_PROTOCOL_KEYS,
    VALIDATION_KEYS,
    ConfigError,
    RunConfig,
    flatten_config,
)
from metabench.run.grid import config_differences
from metabench.run.runner import check_test_overrides
from tests.helpers import tiny_config


def test_every_key_has_one_declared_role() -> None:
    declared = roles(RunConfig)
    assert list(declared) == list(flatten_config(RunConfig().to_dict()))  # every key, keyed as records key them
    assert set(declared.values()) <= set(ROLES)
    assert set(EXECUTION_KEYS) <= set(TEST_KEYS) and set(TEST_PROTOCOL_KEYS) | set(VALIDATION_KEYS) <= set(TEST_KEYS)
    assert VALIDATION_KEYS == ("trainer.val_every",)
    assert {"data.root", "algorithm.engine", "algorithm.task_chunk", "algorithm.source", "trainer.log_every",
            "episodes.eval_batch", "trainer.checkpoint_every"} <= set(EXECUTION_KEYS)
    assert not {"algorithm.inner_lr", "episodes.train_shots", "trainer.max_steps", "trainer.seed"} & set(TEST_KEYS)


def test_role_field_checks_the_role() -> None:
    @dataclasses.dataclass
    class Example:
        a: int = role_field(1, EXECUTION)
        b: list[int] = role_field(role=EXECUTION, default_factory=list)
        c: int = 0

    assert roles(Example) == {"a": EXECUTION, "b": EXECUTION, "c": TRAINING}
    assert Example().b == []
    with pytest.raises(ValueError, match="unknown role 'paths'"):
        role_field(1, "paths")


def test_log_every_and_val_every(tmp_path: Path) -> None:
    """The two keys the hand-written sets disagreed on: log_every changes nothing computed (a grid ignores it, and
    now metabench test accepts it too); val_every makes the run's curve (and protonet's early stopping), so a grid
    cell's record must share it, while a test of finished weights need not repeat it."""
    trained = tiny_config(tmp_path, "maml")
    tested = tiny_config(tmp_path, "maml", extra=["trainer.log_every=7", "trainer.val_every=2500"])
    check_test_overrides(trained.to_dict(), tested)
    assert config_differences(tested.to_dict(), trained.to_dict()) == ["trainer.val_every"]
    with pytest.raises(ConfigError, match="may change only the test protocol"):
        check_test_overrides(trained.to_dict(), tiny_config(tmp_path, "maml", extra=["trainer.max_steps=3"]))
