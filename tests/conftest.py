"""Shared fixtures: where the real data lives, a throw-away cache folder, one torch thread. Shared helpers are in
``tests/helpers.py``.

Real data defaults to ``../shared/data`` beside the repository (or ``$METABENCH_DATA``). Without it, tests
that need it skip on a developer machine but FAIL under CI (``CI=true``): in CI they must run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO


def _data_root() -> Path | None:
    env = os.environ.get("METABENCH_DATA")
    candidates = [Path(env)] if env else [REPO.parent / "shared" / "data"]
    return next((p for p in candidates if p.is_dir()), None)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder holding ``omniglot/``, ``mini-imagenet/``, ``splits/``, ... (real data, read-only)."""
    root = _data_root()
    if root is None:
        message = "real data not found: set METABENCH_DATA or put shared/data beside the repository"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable cache folder shared by the whole test session (prepared caches are built once)."""
    return tmp_path_factory.mktemp("metabench-cache")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> None:
    """One torch thread for the whole suite: on a 2-core machine shared with other work, OpenMP's spinning
    threads make the many tiny convolutions of these tests many times slower; one thread is never that slow."""
    torch.set_num_threads(1)
