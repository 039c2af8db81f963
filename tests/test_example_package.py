"""The example plug-in (examples/boil): a learner (BOIL), a backbone (conv3) and a dataset (blocks) from a package
outside metabench, found through its entry points, run end to end by the public commands: ``metabench run`` on a
benchmark file, ``metabench grid``, records, and a leaderboard row next to MAML on the same test episodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from tests.helpers import write_distribution

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "boil"
BENCHMARK = EXAMPLE / "metabench_boil" / "blocks-5w1s.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a shell where the example is installed: its package importable and its distribution's
    metadata (the entry points of its pyproject.toml) on the path, as ``pip install examples/boil`` leaves them."""
    site = tmp_path_factory.mktemp("site")
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    write_distribution(site, project["name"].replace("-", "_"), project["entry-points"])
    path = os.pathsep.join([str(site), str(EXAMPLE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def metabench(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "metabench", *args], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"metabench {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_plugin_runs_next_to_maml(plugin_env: dict[str, str], tmp_path: Path) -> None:
    """BOIL next to MAML on the embedded synthetic glyphs (``metabench run``), and on the plug-in's own benchmark
    file, dataset and backbone (``metabench grid run``); one leaderboard row each, on each benchmark's episodes."""
    records, runs, board = tmp_path / "records", tmp_path / "runs", tmp_path / "board"
    common = ["--records-dir", str(records), "--out-dir", str(runs), "--accelerator", "cpu", "--max-steps", "20",
              "--test-episodes", "50", "--set", "trainer.cpu_threads=1"]
    both = ["--algorithm", "maml", "--algorithm", "boil"]
    small = ["--set", "data.options.num_classes=40", "--set", "episodes.val_episodes=10",  # seconds, not minutes
             "--set", "model.options.hidden=8", "--set", "algorithm.engine=batched"]
    metabench(plugin_env, "run", "--benchmark", "synthetic-5w1s", *both, *small, "--quiet", *common, cwd=tmp_path)
    metabench(plugin_env, "grid", "run", "--benchmark", str(BENCHMARK), *both, *common, cwd=tmp_path)
    made = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    assert sorted((r["benchmark"], r["algorithm"]) for r in made) == [
        ("blocks-5w1s", "boil"), ("blocks-5w1s", "maml"), ("synthetic-5w1s", "boil"), ("synthetic-5w1s", "maml")]
    for benchmark in ("blocks-5w1s", "synthetic-5w1s"):  # the same fixed test episodes for both learners
        assert len({r["episode_digest"] for r in made if r["benchmark"] == benchmark}) == 1
    boil = next(r for r in made if r["algorithm"] == "boil" and r["benchmark"] == "blocks-5w1s")
    assert boil["config"]["algorithm"]["head"] == "head"  # the plug-in's own config field, recorded
    assert boil["config"]["model"]["backbone"] == "conv3" and boil["config"]["data"]["name"] == "blocks"
    metabench(plugin_env, "leaderboard", "--records", str(records), "--out", str(board), "--no-readme", cwd=tmp_path)
    table = (board / "LEADERBOARD.md").read_text()
    for benchmark in ("blocks-5w1s", "synthetic-5w1s"):
        section = table.split(f"\n## {benchmark}", 1)[1].split("\n## ", 1)[0]  # the benchmark's own table
        rows = [line for line in section.splitlines() if line.startswith("| ")]
        assert {row.split("|")[1].strip(" *") for row in rows} >= {"boil", "maml"}, section


def test_boil_freezes_the_head_in_the_inner_loop(monkeypatch) -> None:
    """BOIL's adaptation moves the body, never the head; its meta-gradient still reaches the head."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from metabench.models.backbones import build_backbone
    from metabench.models.learners import build_algorithm
    from metabench.models.problems import Classification
    from metabench.run.config import resolve

    config = resolve(str(BENCHMARK), "metabench_boil.learner:BOIL")
    assert config.benchmark == "blocks-5w1s" and config.algorithm.head == "head"
    torch.manual_seed(0)
    backbone = build_backbone("metabench_boil.backbone:conv3", 1, 5, 28, hidden=4)
    module = build_algorithm(backbone, Classification(), config.algorithm, 1)
    assert module.params() and not any(name.startswith("head.") for name in module.params())
    assert {n for n, _ in backbone.named_parameters()} - set(module.params()) == {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match="adapt is set by boil"):
        resolve(str(BENCHMARK), "metabench_boil.learner:BOIL", overrides=["algorithm.adapt=[head]"])
