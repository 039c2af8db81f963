"""`metabench run` end to end on tiny synthetic data: records, resume after SIGKILL, divergence, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metabench.datasets.episodes import EpisodeSampler, EpisodeSpec
from metabench.datasets.synthetic import make_glyphs
from metabench.models.algorithms import DivergenceError
from metabench.run.records import read_record
from metabench.run.runner import run
from tests.helpers import TINY_RUN, TINY_RUN_CLASSES, set_flags, tiny_config


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_run_writes_a_valid_record(tmp_path: Path, algorithm: str) -> None:
    config = tiny_config(tmp_path, algorithm)
    result = run(config, progress=False)
    record = read_record(result.record_path)  # validated on read
    assert record.algorithm == algorithm and record.benchmark == "synthetic-5w1s"
    assert record.training_steps == 8 and record.num_episodes == 20 and len(record.scores) == 20
    assert record.config["algorithm"]["name"] == algorithm
    assert record.config["trainer"]["seed"] == record.seed == 0
    split = make_glyphs("test", seed=0, num_classes=TINY_RUN_CLASSES)
    assert record.episode_digest == EpisodeSampler(split, EpisodeSpec(5, 1, 15)).digest(0, 20)
    assert all(0.0 <= s <= 1.0 for s in record.scores)
    assert set(record.versions) >= {"python", "torch", "lightning", "metabench"}
    assert "random_init_mean" in record.baseline
    assert (result.run_dir / "checkpoints" / "last.ckpt").is_file()


def test_same_seed_same_record_scores(tmp_path: Path) -> None:
    a = run(tiny_config(tmp_path / "a", "maml", steps=4), progress=False).record
    b = run(tiny_config(tmp_path / "b", "maml", steps=4), progress=False).record
    c = run(tiny_config(tmp_path / "c", "maml", steps=4, extra=["trainer.seed=1"]), progress=False).record
    assert a.scores == b.scores
    assert a.episode_digest == c.episode_digest  # the test set does not move with the training seed
    assert a.scores != c.scores


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "fomaml", steps=4)
    run(config, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run(config, progress=False)


def test_divergence_stops_with_clear_error_and_keeps_checkpoint(tmp_path: Path) -> None:
    # 1e30 overflows float32 on every engine (at 1e6 the batched engine's native batch norm stays finite, only
    # huge, while the plain-op one turns NaN: a divergence test must not depend on the engine).
    config = tiny_config(tmp_path, "maml", steps=40, extra=["algorithm.meta_lr=1e30", "algorithm.inner_lr=1e30"])
    with pytest.raises(DivergenceError, match="meta-loss is (nan|inf)"):
        run(config, progress=False)
    assert not list((tmp_path / "records").glob("*.json"))


def _cli(tmp_path: Path, out: str, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "metabench.cli", "run", "--algorithm", "maml", "--quiet", "--accelerator", "cpu",
            "--out-dir", str(tmp_path / out), "--records-dir", str(tmp_path / out / "records"),
            "--max-steps", "24", *set_flags(TINY_RUN),
            # One engine for both runs: the engines agree only to float rounding, and "auto" times them afresh in
            # every run, so on a loaded machine two runs may pick differently; resume keeps the killed run's pick.
            "--set", "algorithm.engine=sequential"]
    return args + list(extra)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = subprocess.run(_cli(tmp_path, "ref"), capture_output=True, text=True, timeout=900, env=env)
    assert reference.returncode == 0, reference.stderr[-2000:]

    victim = subprocess.Popen(_cli(tmp_path, "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)
    ckpt = tmp_path / "killed" / "synthetic-5w1s" / "maml-default-seed0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        if ckpt.exists() and _ckpt_step(ckpt) >= 8:
            break
        time.sleep(0.2)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = _ckpt_step(ckpt)
    assert 8 <= killed_at < 24
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]
    clock = next(v["seconds"] for k, v in saved.items() if "_Clock" in k)
    points = next(v["points"] for k, v in saved.items() if "_Curve" in k)

    resumed = subprocess.run(_cli(tmp_path, "killed", "--resume"), capture_output=True, text=True, timeout=900,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (ref_path,) = (tmp_path / "ref" / "records").glob("*.json")
    (res_path,) = (tmp_path / "killed" / "records").glob("*.json")
    ref, res = json.loads(ref_path.read_text()), json.loads(res_path.read_text())
    assert res["training_steps"] == ref["training_steps"] == 24
    assert res["scores"] == ref["scores"] and res["mean"] == ref["mean"]
    # Training continued from the checkpoint (a fresh deterministic run would reach the same scores): the resumed
    # process started at the killed run's step, its validation curve begins with the killed run's points (same
    # training-clock values) and its clock went on from the killed run's.
    assert res["config"]["resolved"]["resumed_from"] == {"checkpoint": "last.ckpt", "step": killed_at}
    assert "resumed_from" not in ref["config"]["resolved"]
    assert points and res["curve"][:len(points)] == points
    assert res["train_seconds"] > clock


def _ckpt_step(path: Path) -> int:
    for _ in range(20):  # the file may be mid-replace; retry briefly
        try:
            return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
        except Exception:  # noqa: BLE001 - a torn read is retried
            time.sleep(0.1)
    return -1


def test_cli_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "metabench.cli", "run", "--benchmark", "nope", "--quiet"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    assert "unknown benchmark 'nope'" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "metabench.cli", "run", "--set", "algorithm.inner_lr=fast"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "algorithm.inner_lr: expected a number" in out.stderr


def test_non_transductive_evaluation_is_recorded(tmp_path: Path) -> None:
    """The Reptile paper's protocol: each query is scored in a batch of support + that query alone."""
    config = tiny_config(tmp_path, "reptile", steps=4, extra=["algorithm.bn_mode=non-transductive"])
    record = run(config, progress=False).record
    assert record.config["algorithm"]["bn_mode"] == "non-transductive"
    transductive = run(tiny_config(tmp_path / "t", "reptile", steps=4), progress=False).record
    assert record.episode_digest == transductive.episode_digest
    assert record.scores != transductive.scores  # batch statistics differ, so do the predictions


# -- metabench test: a finished run on another test protocol ---------------------------------------------

def test_test_run_reproduces_the_run_and_scores_another_protocol(tmp_path: Path) -> None:
    """Same protocol: the run's own scores and random-init baseline, exactly (same weights, same init, same
    episodes). One query per class: another digest, the run's steps and time, a second record."""
    from metabench.run.runner import test_run

    trained = run(tiny_config(tmp_path, "maml", steps=6), progress=False)
    again = test_run(tiny_config(tmp_path, "maml", steps=6)).record
    assert again.scores == trained.record.scores and again.episode_digest == trained.record.episode_digest
    assert again.baseline == trained.record.baseline
    assert again.training_steps == 6 and again.train_seconds == pytest.approx(trained.record.train_seconds, rel=0.2)
    assert again.config["resolved"]["tested_checkpoint"]["step"] == 6

    one = test_run(tiny_config(tmp_path, "maml", steps=6, extra=["episodes.queries=1"]))
    record = read_record(one.record_path)
    assert record.config["episodes"]["queries"] == 1 and record.episode_digest != trained.record.episode_digest
    split = make_glyphs("test", seed=0, num_classes=TINY_RUN_CLASSES)
    assert record.episode_digest == EpisodeSampler(split, EpisodeSpec(5, 1, 1)).digest(0, 20)
    assert record.training_steps == 6 and record.run_id != trained.record.run_id
    assert len(list((tmp_path / "records").glob("*.json"))) == 3


def _cli_test(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "metabench.cli", "test", "--algorithm", "maml", "--out-dir", str(tmp_path / "runs"),
            "--records-dir", str(tmp_path / "records"), "--accelerator", "cpu",
            *set_flags(TINY_RUN + ["trainer.max_steps=4"])]
    return subprocess.run(args + list(extra), capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_test_cli_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    out = _cli_test(tmp_path)
    assert out.returncode == 2 and "no trained run to test" in out.stderr and "Traceback" not in out.stderr
    run(tiny_config(tmp_path, "maml", steps=4), progress=False)
    out = _cli_test(tmp_path, "--set", "algorithm.inner_lr=0.1")  # a training hyper-parameter
    assert out.returncode == 2 and "may change only the test protocol" in out.stderr
    assert "algorithm.inner_lr" in out.stderr
    out = _cli_test(tmp_path, "--set", "episodes.queries=2", "--set", "algorithm.eval_steps=3")
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list((tmp_path / "records").glob("*.json"))) == 2


def test_test_accepts_a_run_saved_before_a_key_existed(tmp_path: Path) -> None:
    """A run folder's config.json from before a field was added (e.g. MAML++'s switches) lacks the key: it counts
    as the field's default, so `metabench test` still evaluates the run; a changed value is still refused."""
    from metabench.run.config import ConfigError
    from metabench.run.runner import check_test_overrides

    config = tiny_config(tmp_path, "maml")
    saved = config.to_dict()
    for key in ("msl", "lslr", "per_step_bn", "first_order_epochs", "cosine_annealing", "meta_lr_min"):
        del saved["algorithm"][key]
    check_test_overrides(saved, config)
    with pytest.raises(ConfigError, match="algorithm.msl_epochs"):
        check_test_overrides(saved, tiny_config(tmp_path, "maml", extra=["algorithm.msl_epochs=3"]))


def test_test_ignores_the_training_runs_validation_and_checkpoint_cadence(tmp_path: Path) -> None:
    """A run trained with --set trainer.val_every / trainer.checkpoint_every is tested without repeating them (the
    flagship run's case): they change neither the weights nor the test; what was trained is still checked."""
    from metabench.run.config import ConfigError
    from metabench.run.runner import check_test_overrides, with_training_shape

    saved = tiny_config(tmp_path, "maml", extra=["trainer.val_every=2500", "trainer.checkpoint_every=500"]).to_dict()
    # test_run first fills the training episode shape the tested config leaves null with the run's own (15 queries)
    one_query = tiny_config(tmp_path, "maml", extra=["episodes.queries=1"])
    check_test_overrides(saved, with_training_shape(one_query, saved))
    assert with_training_shape(one_query, saved).episodes.train_queries == 15
    with pytest.raises(ConfigError, match="episodes.train_queries"):  # unfilled, it would claim training on 1
        check_test_overrides(saved, one_query)
    with pytest.raises(ConfigError, match="algorithm.inner_lr"):
        check_test_overrides(saved, tiny_config(tmp_path, "maml", extra=["algorithm.inner_lr=0.1"]))


def test_test_run_refuses_an_unfinished_run(tmp_path: Path) -> None:
    from metabench.run.runner import test_run

    result = run(tiny_config(tmp_path, "maml", steps=4), progress=False)
    saved = result.run_dir / "config.json"  # as if the run had been planned for 8 steps and stopped at 4
    saved.write_text(saved.read_text().replace('"max_steps": 4', '"max_steps": 8'))
    with pytest.raises(ValueError, match="at step 4 of 8: training has not finished"):
        test_run(tiny_config(tmp_path, "maml", steps=8))


def test_resume_with_nothing_to_resume_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(tiny_config(tmp_path, "fomaml", steps=2), resume=True, progress=False)
    assert "nothing to resume" in capsys.readouterr().err


def test_build_datamodule_uses_a_given_split_and_the_cache_for_generated_data(tmp_path: Path) -> None:
    """Regression: ``load_split or partial(...) if needs_root else partial(...)`` parsed as ``(load_split or
    ...) if ... else ...``, so a split loader passed for a generated dataset was ignored, and generated datasets
    never got ``data.cache_dir``."""
    from metabench.run.runner import build_datamodule

    given = make_glyphs("train", seed=3, num_classes=12)
    config = tiny_config(tmp_path, "maml")
    module = build_datamodule(config, load_split=lambda _name: given)
    module.setup("fit")
    assert module.train_sampler.split is given

    cached = tiny_config(tmp_path, "maml", extra=[f"data.cache_dir={tmp_path / 'cache'}"])
    build_datamodule(cached).setup("fit")
    assert any((tmp_path / "cache").rglob("*")), "the generated split was not cached in data.cache_dir"
