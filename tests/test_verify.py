"""Checking a result: `metabench verify` retrains a record's first steps bit for bit, published weights are
checked against their record and `metabench test --weights` reproduces the record's scores (tiny synthetic run)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from metabench.run import verify as verify_module
from metabench.run.published import test_weights as evaluate_weights
from metabench.run.records import read_record, record_path
from metabench.run.runner import RunResult, run
from metabench.run.runner import test_run as retest_run
from metabench.run.verify import VerifyError, code_changes, verify
from metabench.run.weights import WEIGHTS_FILE, WeightsError, publish, read_weights, state_sha256, write_weights
from tests.helpers import tiny_config


@dataclass(frozen=True)
class Published:
    run: RunResult
    record: Path  # results/records/<stem>.json (a copy of the run's record)
    weights: Path  # results/weights/<stem>.safetensors


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """One tiny MAML run (8 steps; TINY_RUN validates every 4: curve points at 4 and 8), its record and weights
    published as in results/."""
    root = tmp_path_factory.mktemp("verify")
    result = run(tiny_config(root, "maml"), progress=False)
    results = root / "results"
    record = results / "records" / result.record_path.name
    record.parent.mkdir(parents=True)
    record.write_bytes(result.record_path.read_bytes())
    weights = publish(record, result.run_dir, results / "weights")
    return Published(result, record, weights)


@pytest.fixture
def same_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training code counts as the record's (a test tree may carry uncommitted changes)."""
    monkeypatch.setattr(verify_module, "code_changes", lambda commit: None)


def edited(source: Path, target: Path, edit) -> Path:
    data = json.loads(source.read_text())
    edit(data)
    target.write_text(json.dumps(data))
    return target


def test_a_run_records_its_provenance_and_weights(published: Published) -> None:
    record = read_record(published.record)
    assert record.execution["processes"] == 1 and record.execution["threads"] == torch.get_num_threads()
    assert record.execution["training"] == [[0, 1, torch.get_num_threads()]]
    assert record.execution["engine"] == record.config["resolved"]["engine"] != "auto"
    state, metadata = read_weights(published.run.run_dir / WEIGHTS_FILE, record.weights_sha256)
    checkpoint = torch.load(published.run.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert state_sha256(checkpoint["state_dict"]) == record.weights_sha256  # the tested weights are the final ones
    assert metadata["sha256"] == record.weights_sha256 and metadata["training_steps"] == "8"
    assert published.weights.name == record_path("", record).stem + ".safetensors"
    assert published.weights.read_bytes() == (published.run.run_dir / WEIGHTS_FILE).read_bytes()


def test_verify_a_short_synthetic_run_is_bit_identical(published: Published) -> None:
    record = read_record(published.record)
    result = verify(published.record)
    assert result.step == 4 and [c.identical for c in result.comparisons] == [True] * 4
    assert [c.reproduced for c in result.comparisons] == [record.curve[0][2], record.baseline["random_init_mean"],
                                                          record.episode_digest, record.data_sha256]
    assert result.verdict == "bit-identical" and result.exit_status == 0
    lines = result.lines()
    assert lines[2] == f"validation accuracy at step 4: bit-identical ({record.curve[0][2]!r})"
    assert lines[-1].startswith("verdict: bit-identical")
    assert verify(published.record, steps=5).step == 8  # the first curve point at or after 5


def test_verify_measures_the_float_noise_of_another_engine(published: Published) -> None:
    result = verify(published.record, noise=True)
    engine = read_record(published.record).execution["engine"]
    assert result.noise is not None and result.noise[0] >= 0.0
    other = "sequential" if engine in ("batched", "batched-fused") else "batched-fused"  # outside the run's family
    assert result.noise[1] == f"engine {other} vs {engine}"
    assert any(line.startswith("float noise: the same command, engine") for line in result.lines())


def test_an_edited_curve_value_fails_with_a_clear_line(published: Published, tmp_path: Path, same_code: None) -> None:
    def edit(data: dict) -> None:
        data["curve"][0][2] += 0.125

    result = verify(edited(published.record, tmp_path / "edited.json", edit))
    value = read_record(published.record).curve[0][2]
    assert result.verdict == "different" and result.exit_status == 1
    assert result.lines()[2] == f"validation accuracy at step 4: different by 0.125 (record {value + 0.125!r}, " \
                                f"reproduced {value!r})"


def test_a_difference_with_other_versions_or_data_cannot_be_verified(published: Published, tmp_path: Path,
                                                                     same_code: None) -> None:
    def edit(data: dict) -> None:
        data["curve"][0][2] += 0.125
        data["versions"]["torch"] = "1.0"
        data["data_sha256"] = "00" * 32

    result = verify(edited(published.record, tmp_path / "other.json", edit))
    assert result.verdict == "cannot verify" and result.exit_status == 3
    assert f"versions differ: torch 1.0 here {torch.__version__}" in result.lines()[-1]
    assert "data differ: the splits read here hash to" in result.lines()[-1]


def test_code_changes_are_named(tmp_path: Path) -> None:
    assert code_changes(None) == "code unknown: the record names no git commit"
    assert code_changes("0" * 40) == "code unknown: commit 0000000000 is not in this source tree's history"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "inner_loop.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("docs\n")
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "README.md").write_text("other docs\n")  # not training code
    assert code_changes(commit, tmp_path) is None
    assert code_changes(commit + "+dirty", tmp_path).startswith("code unknown: the record was made from uncommitted")
    (tmp_path / "models" / "inner_loop.py").write_text("x = 2\n")
    assert code_changes(commit, tmp_path) == f"code differs: models/inner_loop.py changed since {commit[:10]}"


def test_code_changes_follow_training_code_across_a_move(tmp_path: Path) -> None:
    """A record made before the layout of issue 24 names a commit with benchmarks/runner.py and stats.py: moved
    unchanged they are no change; moved and edited, the edit is named by the file's path now."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "benchmarks").mkdir()
    for name in ("runner.py", "stats.py"):
        (tmp_path / "benchmarks" / name).write_text(f"# {name}\nx = 1\n")
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    for old, new in (("runner.py", "run/runner.py"), ("stats.py", "core/stats.py")):
        (tmp_path / "benchmarks" / new).parent.mkdir(exist_ok=True)
        subprocess.run([*git, "mv", f"benchmarks/{old}", f"benchmarks/{new}"], cwd=tmp_path, check=True)
    assert code_changes(commit, tmp_path) is None
    (tmp_path / "benchmarks" / "run" / "runner.py").write_text("# runner.py\nx = 2\n")
    assert code_changes(commit, tmp_path) == f"code differs: benchmarks/run/runner.py changed since {commit[:10]}"


def test_verify_refuses_records_it_cannot_rebuild(published: Published, tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match="no validation curve"):
        verify(edited(published.record, tmp_path / "a.json", lambda d: d.update(curve=[])))
    with pytest.raises(VerifyError, match=r"--steps 9 is past the record's last curve point \(step 8\)"):
        verify(published.record, steps=9)
    with pytest.raises(VerifyError, match="not algorithm.inner_lr"):
        verify(published.record, overrides={"algorithm.inner_lr": 0.1})
    with pytest.raises(VerifyError, match="cannot rebuild the record's configuration: unknown key.*trainer.warp"):
        verify(edited(published.record, tmp_path / "b.json", lambda d: d["config"]["trainer"].update(warp=1)))

    def old_test_record(data: dict) -> None:
        data["config"]["resolved"]["tested_checkpoint"] = {"path": "x", "step": 8}

    with pytest.raises(VerifyError, match="verify the run's own record instead"):
        verify(edited(published.record, tmp_path / "c.json", old_test_record))

    def no_engine(data: dict) -> None:
        data["execution"]["engine"] = ""
        del data["config"]["resolved"]["engine"]

    with pytest.raises(VerifyError, match=r"which engine `auto` chose \(config.resolved.engine\)"):
        verify(edited(published.record, tmp_path / "d.json", no_engine))


def test_test_weights_reproduces_the_records_own_scores(published: Published) -> None:
    result = evaluate_weights(published.weights)
    assert result.path is None and result.reproduces()  # the record's protocol: compared, not written again
    source = read_record(published.record)
    assert result.record.scores == source.scores and result.record.baseline == source.baseline
    assert result.record.weights_sha256 == source.weights_sha256


def test_weights_on_another_protocol_write_a_record_that_verify_reproduces(published: Published, tmp_path: Path
                                                                           ) -> None:
    result = evaluate_weights(published.weights, {"episodes.queries": 1, "records_dir": str(tmp_path)})
    record = read_record(result.path)
    assert record.config["episodes"]["queries"] == 1 and record.episode_digest != result.source.episode_digest
    assert record.config["resolved"]["trained"] == {"episodes.queries": 15}
    assert record.curve == result.source.curve and record.training_steps == 8
    assert verify(result.path).verdict == "bit-identical"  # trains with 15 queries, tests the 1-query baseline


def test_a_run_tested_again_writes_the_same_weights_and_its_training_protocol(published: Published,
                                                                              tmp_path: Path) -> None:
    config = tiny_config(published.run.run_dir.parent.parent.parent, "maml",
                         extra=["episodes.queries=1", f"records_dir={tmp_path}"])
    record = retest_run(config).record
    assert record.weights_sha256 == read_record(published.record).weights_sha256
    assert record.config["resolved"]["trained"] == {"episodes.queries": 15}
    assert record.execution["training"] == [[0, 1, torch.get_num_threads()]]


def test_weights_that_differ_from_their_record_are_refused(published: Published, tmp_path: Path) -> None:
    state, _ = read_weights(published.weights, None)
    name = sorted(state)[0]
    state[name] = state[name] + 1e-6
    folder = tmp_path / "results" / "weights"
    folder.mkdir(parents=True)
    tampered = folder / published.weights.name
    save_file(state, str(tampered))
    (tmp_path / "results" / "records").mkdir()
    (tmp_path / "results" / "records" / published.record.name).write_bytes(published.record.read_bytes())
    with pytest.raises(WeightsError, match="differs from the record's .*not the weights that record was made with"):
        evaluate_weights(tampered)
    with pytest.raises(FileNotFoundError, match="its record .* does not exist"):
        evaluate_weights(published.weights, record=tmp_path / "nowhere.json")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        read_weights(published.record, None)


def test_the_weights_digest_is_over_the_tensors_not_the_file(tmp_path: Path) -> None:
    state = {"b": torch.tensor([1.0, -2.0]), "a": torch.zeros(2, 1, dtype=torch.float64)}
    expected = hashlib.sha256()
    for name, dtype, shape, data in (("a", "float64", [2, 1], bytes(16)),
                                     ("b", "float32", [2], bytes.fromhex("0000803f000000c0"))):
        expected.update(json.dumps([name, dtype, shape]).encode() + b"\0" + data)
    assert state_sha256(state) == expected.hexdigest()
    first = write_weights(tmp_path / "a.safetensors", state, {"note": "one"})
    second = write_weights(tmp_path / "b.safetensors", state, {"note": "two"})
    assert first == second == expected.hexdigest()
    assert (tmp_path / "a.safetensors").read_bytes() != (tmp_path / "b.safetensors").read_bytes()


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from metabench.cli import main

    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_verify_publish_and_test_weights(published: Published, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _cli(capsys, "verify", str(published.record))
    assert status == 0 and "validation accuracy at step 4: bit-identical" in out  # whatever else differs is named
    status, out, _ = _cli(capsys, "test", "--weights", str(published.weights))
    assert status == 0 and f"reproduces {published.record.name}: 20 scores bit-identical" in out
    status, _, err = _cli(capsys, "verify", str(published.record), "--set", "algorithm.meta_lr=1")
    assert status == 2 and err.startswith(f"metabench: error: {published.record}: verify may change only")
    assert err.count("\n") == 1
    status, _, err = _cli(capsys, "test", "--weights", str(published.weights), "--record", str(tmp_path / "x.json"))
    assert status == 2 and "x.json does not exist" in err and err.count("\n") == 1
    status, _, err = _cli(capsys, "publish", str(published.record), "--out-dir", str(tmp_path))
    assert status == 2 and "the run folder of" in err
