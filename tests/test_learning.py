"""Learning, slow: each algorithm, trained a few minutes on CPU on synthetic glyphs 5-way 1-shot, beats chance
(20%) and the same adaptation from its own random initialization by >= 15 points on the fixed test episodes.
The baselines (ProtoNet, Baseline, Baseline++) are shortened to under a minute of training each; their random-init
column is the same test procedure (prototypes / a fitted head) on the untrained network's features."""

from __future__ import annotations

from pathlib import Path

import pytest

from metabench.run.config import resolve
from metabench.run.runner import run
from tests.helpers import local_run

STEPS = {"maml": 250, "fomaml": 250, "anil": 250, "metasgd": 250, "mamlpp": 250, "reptile": 400, "protonet": 400,
         "baseline": 1000, "baseline++": 1000}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(STEPS))
def test_meta_learning_beats_random_init(tmp_path: Path, algorithm: str) -> None:
    config = resolve("synthetic-5w1s", algorithm, overrides=[
        f"trainer.max_steps={STEPS[algorithm]}", f"trainer.val_every={STEPS[algorithm]}", "episodes.val_episodes=20",
        "episodes.test_episodes=200"] + local_run(tmp_path))
    record = run(config, progress=False).record
    random_init = record.baseline["random_init_mean"]
    print(f"{algorithm}: {100 * record.mean:.1f}% +- {100 * record.ci95:.1f} vs random init "
          f"{100 * random_init:.1f}% ({record.train_seconds:.0f} s of training)")
    assert record.mean > 0.20 + 0.15
    assert record.mean >= random_init + 0.15
