"""`metabench grid` on tiny synthetic cells: a 2-cell grid end to end (then every cell skipped), resume of an
interrupted cell, N processes at a time, the W&B Sweep configuration (structure as W&B documents it, and the
commands its agent would run, through the real `metabench run` parser), and bad input."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from rich.progress import Progress

from metabench.cli import dotted_overrides, main, run_args_resolver
from metabench.run.grid import Job, execute
from metabench.run.records import read_record
from metabench.run.runner import run
from tests.helpers import TINY_RUN, local_run, set_flags, tiny_config

CPU_ONE_THREAD = ["trainer.cpu_threads=1"]  # cells as processes: one torch thread each (a shared 2-core machine)


def _grid_flags(tmp_path: Path, steps: int) -> list[str]:
    """Run options that keep every cell tiny, on the CPU, and its files under ``tmp_path``."""
    flags = ["--max-steps", str(steps), "--accelerator", "cpu", "--out-dir", str(tmp_path / "runs"),
             "--records-dir", str(tmp_path / "records")]
    return flags + set_flags(TINY_RUN + CPU_ONE_THREAD)


def _records(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "records").glob("*.json"))


# -- local grid ---------------------------------------------------------------------------------------------

def test_two_cell_grid_runs_then_skips_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"benchmark": "synthetic-5w1s", "algorithm": ["maml", "fomaml"], "seed": [3]}))
    assert main(["grid", "run", "--grid", str(grid), *_grid_flags(tmp_path, steps=4)]) == 0
    out = capsys.readouterr().out
    assert "2 done, 0 skipped (record exists), 0 failed" in out, out
    records = [read_record(path) for path in _records(tmp_path)]
    assert sorted(r.algorithm for r in records) == ["fomaml", "maml"]
    assert all(r.seed == 3 and r.training_steps == 4 and r.benchmark == "synthetic-5w1s" for r in records)
    assert records[0].episode_digest == records[1].episode_digest
    for algorithm in ("maml", "fomaml"):  # each cell's output went to its run folder's log
        log = tmp_path / "runs" / "synthetic-5w1s" / f"{algorithm}-default-seed3" / "grid.log"
        assert "metabench.cli run --benchmark=synthetic-5w1s" in log.read_text()

    assert main(["grid", "run", "--grid", str(grid), *_grid_flags(tmp_path, steps=4)]) == 0
    out = capsys.readouterr().out
    assert "0 done, 2 skipped (record exists), 0 failed" in out, out
    assert len(_records(tmp_path)) == 2

    # Another step count is another cell: the 4-step records do not count for it, and its run folders (those of
    # the 4-step runs) are not reused; another --out-dir gives it fresh ones.
    assert main(["grid", "list", "--grid", str(grid), *_grid_flags(tmp_path, steps=6)]) == 0
    listing = capsys.readouterr().out
    assert listing.count("│ conflict │") == 2 and "trainer.max_steps 4 there, 6 here" in listing, listing
    assert main(["grid", "list", "--grid", str(grid), *_grid_flags(tmp_path, steps=6), "--out-dir",
                 str(tmp_path / "runs6")]) == 0
    assert capsys.readouterr().out.count("│ new ") == 2


def test_interrupted_cell_is_resumed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A run stopped at step 4 of 8: its folder holds last.ckpt at step 4 and the 8-step config.json, no record,
    # and the lock of a grid killed with it (its process is gone: a stale lock).
    extra = CPU_ONE_THREAD + ["algorithm.inner_lr=0.3"]
    partial = run(tiny_config(tmp_path, "maml", steps=4, extra=extra), progress=False, write=False)
    saved = partial.run_dir / "config.json"
    saved.write_text(saved.read_text().replace('"max_steps": 4', '"max_steps": 8'))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = {"host": socket.gethostname(), "pid": int(ended.stdout)}
    (partial.run_dir / "grid.lock").write_text(json.dumps(lock))

    flags = _grid_flags(tmp_path, steps=8) + ["--set", "algorithm.inner_lr=0.3"]
    assert main(["grid", "list", "--benchmark", "synthetic-5w1s", "--algorithm", "maml", *flags]) == 0
    assert re.search(r"synthetic-5w1s/maml/default +│ resume +│", capsys.readouterr().out)
    assert main(["grid", "run", "--benchmark", "synthetic-5w1s", "--algorithm", "maml", *flags]) == 0
    out = capsys.readouterr().out
    assert "resumed and done" in out and "1 done, 0 skipped" in out, out
    assert "--resume" in (partial.run_dir / "grid.log").read_text()
    assert not (partial.run_dir / "grid.lock").exists()  # taken over, then released

    (path,) = _records(tmp_path)
    resumed = read_record(path)
    reference = run(tiny_config(tmp_path / "ref", "maml", steps=8, extra=extra), progress=False).record
    assert resumed.training_steps == 8 and [p[0] for p in resumed.curve] == [4, 8]
    assert resumed.scores == reference.scores  # the same training as an uninterrupted run


def test_run_folder_of_another_configuration_fails_the_cell_only(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path, "maml", steps=4, extra=CPU_ONE_THREAD + ["algorithm.inner_lr=0.9"])
    folder = tmp_path / "runs" / "synthetic-5w1s" / "maml-default-seed0"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")  # only its presence is looked at before running
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    status = main(["grid", "run", "--benchmark", "synthetic-5w1s", "--algorithm", "maml",
                   *_grid_flags(tmp_path, steps=4)])
    out = capsys.readouterr().out
    assert status == 1 and "0 done, 0 skipped (record exists), 1 failed" in out, out
    assert "holds a run of another configuration (algorithm.inner_lr 0.9 there, 0.4 here)" in out
    assert not (folder / "grid.log").exists() and not _records(tmp_path)


def test_cells_run_n_at_a_time_and_failures_are_reported(tmp_path: Path) -> None:
    script = ("import sys, time; open(sys.argv[1], 'w').write(repr(time.time())); time.sleep(0.6); "
              "open(sys.argv[1], 'a').write(' ' + repr(time.time())); sys.exit(int(sys.argv[2]))")
    jobs = [Job(f"job{i}", [sys.executable, "-c", script, str(tmp_path / f"t{i}"), str(int(i == 1))],
                tmp_path / f"job{i}.log") for i in range(5)]
    pids: list[int] = []
    jobs[0].launched = pids.append
    outcomes = []
    with open(tmp_path / "progress.txt", "w") as sink, Progress(console=Console(file=sink)) as progress:
        execute(jobs, 2, progress, lambda job: None if job.label == "job4" else job,  # job4: passed over
                lambda job, outcome: outcomes.append(outcome), poll_seconds=0.05)
    assert sorted(o.job.label for o in outcomes) == ["job0", "job1", "job2", "job3"]
    assert {o.job.label: o.returncode for o in outcomes}["job1"] == 1 and len(pids) == 1
    spans = [tuple(map(float, (tmp_path / f"t{i}").read_text().split())) for i in range(4)]
    most = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert most == 2  # two at a time, never more
    assert all(o.job.log.read_text().startswith("\n== ") for o in outcomes)  # the command heads each log
    assert not (tmp_path / "t4").exists()


def test_a_cell_another_grid_runs_is_left_to_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "runs" / "synthetic-5w1s" / "maml-default-seed0"
    folder.mkdir(parents=True)
    (folder / "grid.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))  # alive
    argv = ["--benchmark", "synthetic-5w1s", "--algorithm", "maml", *_grid_flags(tmp_path, steps=4)]
    assert main(["grid", "list", *argv]) == 0
    assert re.search(r"│ running +│ pid \d+ on", capsys.readouterr().out)
    assert main(["grid", "run", *argv]) == 0
    out = capsys.readouterr().out
    assert "0 done, 0 skipped (record exists), 0 failed, 1 running in another process" in out, out
    assert not (folder / "grid.log").exists() and (folder / "grid.lock").exists()


# -- W&B Sweep ----------------------------------------------------------------------------------------------

# The sweep configuration keys and command macros that W&B documents ("Sweep configuration options").
SWEEP_KEYS = {"program", "method", "parameters", "metric", "name", "description", "command", "project", "entity",
              "early_terminate", "run_cap"}
COMMAND_MACROS = {"${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_no_boolean_flags}",
                  "${args_json}", "${args_json_file}"}


def check_sweep_structure(sweep: dict[str, Any]) -> None:
    """The documented structure of a grid sweep: method grid, categorical parameters, a command list whose
    macros W&B knows, a metric with a name and a goal."""
    assert set(sweep) <= SWEEP_KEYS, set(sweep) - SWEEP_KEYS
    assert sweep["method"] == "grid"
    assert isinstance(sweep["program"], str) and isinstance(sweep.get("name", ""), str)
    assert isinstance(sweep["parameters"], dict) and sweep["parameters"]
    for name, spec in sweep["parameters"].items():
        assert isinstance(name, str) and isinstance(spec, dict), name
        # grid search enumerates categorical parameters only: `values: [...]` or `value: x`
        assert set(spec) in ({"values"}, {"value"}), (name, spec)
        if "values" in spec:
            assert isinstance(spec["values"], list) and spec["values"], (name, spec)
    command = sweep["command"]
    assert isinstance(command, list) and all(isinstance(chunk, str) for chunk in command)
    assert [chunk for chunk in command if chunk.startswith("${")] == ["${env}", "${args}"]
    assert set(re.findall(r"\$\{[^}]*\}", " ".join(command))) <= COMMAND_MACROS
    if "metric" in sweep:
        assert set(sweep["metric"]) <= {"name", "goal", "target"} and isinstance(sweep["metric"]["name"], str)
        assert sweep["metric"].get("goal", "minimize") in ("minimize", "maximize")


def agent_commands(sweep: dict[str, Any]) -> list[list[str]]:
    """Every command a W&B agent would start for the grid sweep, its parameters written by wandb's own code."""
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")  # wandb's agent formats ${args} with it
    names = list(sweep["parameters"])
    grids = [spec["values"] if "values" in spec else [spec["value"]] for spec in sweep["parameters"].values()]
    commands = []
    for values in itertools.product(*grids):
        macros = utils.create_sweep_command_args({"args": {n: {"value": v} for n, v in zip(names, values)}})
        macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
        commands.append([part for chunk in sweep["command"]
                         for part in (macros[chunk[2:-1]] if chunk.startswith("${") else [chunk])])
    return commands


def _sweep_flags(tmp_path: Path) -> list[str]:
    return ["--benchmark", "synthetic-5w1s", "--algorithm", "maml", "--algorithm", "fomaml", "--seed", "0",
            "--seed", "1", "--vary", "algorithm.inner_lr=[0.2, 0.4]", "--logger", "none",
            *_grid_flags(tmp_path, steps=4)]


def test_sweep_yaml_has_the_documented_structure(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    out = tmp_path / "sweep.yaml"
    assert main(["grid", "sweep", *_sweep_flags(tmp_path), "--out", str(out), "--name", "tiny"]) == 0
    assert "wandb sweep" in capsys.readouterr().err
    sweep = yaml.safe_load(out.read_text())
    check_sweep_structure(sweep)
    assert sweep["name"] == "tiny" and sweep["metric"] == {"name": "test/accuracy", "goal": "maximize"}
    assert sweep["parameters"] == {"benchmark": {"values": ["synthetic-5w1s"]},
                                   "algorithm": {"values": ["maml", "fomaml"]}, "seed": {"values": [0, 1]},
                                   "algorithm.inner_lr": {"values": [0.2, 0.4]}}
    command = sweep["command"]
    assert command[:3] == ["${env}", "metabench", "run"] and command[-1] == "${args}"
    assert f"--out-dir={tmp_path / 'runs'}/algorithm.inner_lr={{algorithm.inner_lr}}" in command
    assert "--logger=none" in command and "--logger=wandb" not in command and "--quiet" in command

    # Without --logger the runs log to W&B; the default project is where make_wandb_logger logs.
    assert main(["grid", "sweep", "--benchmark", "synthetic-5w1s", "--algorithm", "maml"]) == 0
    default = yaml.safe_load(capsys.readouterr().out.split("\n", 4)[-1])
    check_sweep_structure(default)
    assert "--logger=wandb" in default["command"] and default["project"] == "metabench"
    assert set(default["parameters"]) == {"benchmark", "algorithm"}  # default preset and seed: not parameters


def test_agent_commands_are_the_grid_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each command the agent would run resolves, through `metabench run`'s parser, to one cell of the local grid
    (same configuration, same run folder), and one of them runs end to end."""
    out = tmp_path / "sweep.yaml"
    assert main(["grid", "sweep", *_sweep_flags(tmp_path), "--out", str(out)]) == 0
    commands = agent_commands(yaml.safe_load(out.read_text()))
    assert len(commands) == 8
    assert commands[0][:3] == ["/usr/bin/env", "metabench", "run"]
    assert "--algorithm.inner_lr=0.2" in commands[0] and "--seed=0" in commands[0]

    resolve_args = run_args_resolver()
    agent = sorted(json.dumps(resolve_args(command[3:]).to_dict(), sort_keys=True) for command in commands)
    assert main(["grid", "list", *_sweep_flags(tmp_path)]) == 0
    assert "8 cells" in capsys.readouterr().out
    from metabench.cli import _grid_plan, build_parser

    _, plan, _ = _grid_plan(build_parser().parse_args(["grid", "list", *_sweep_flags(tmp_path)]))
    assert agent == sorted(json.dumps(item.config.to_dict(), sort_keys=True) for item in plan.cells)
    folders = {item.config.out_dir for item in plan.cells}
    assert folders == {str(tmp_path / "runs" / f"algorithm.inner_lr={lr}") for lr in (0.2, 0.4)}

    # The agent's argument format through the real CLI: seed 1, fomaml, inner_lr 0.2, trained and recorded.
    (command,) = [c for c in commands if {"--algorithm=fomaml", "--seed=1", "--algorithm.inner_lr=0.2"} <= set(c)]
    assert main(command[2:]) == 0
    (record,) = [read_record(path) for path in _records(tmp_path)]
    assert (record.algorithm, record.seed, record.config["algorithm"]["inner_lr"]) == ("fomaml", 1, 0.2)
    assert record.config["out_dir"] == str(tmp_path / "runs" / "algorithm.inner_lr=0.2")
    assert record.config["data"]["options"]["num_classes"] == 40 and record.training_steps == 4
    # ... and the local grid now counts that cell as done.
    assert main(["grid", "list", *_sweep_flags(tmp_path)]) == 0
    assert len(re.findall(r"│ done +│", capsys.readouterr().out)) == 1


def test_dotted_flags_are_set_overrides() -> None:
    assert dotted_overrides(["--algorithm.inner_lr=0.2", "--data.options.num_classes", "40",
                             "--trainer.max_time_minutes=None", "--algorithm.adapt=['head']"]) == [
        "algorithm.inner_lr=0.2", "data.options.num_classes=40", "trainer.max_time_minutes=null",
        "algorithm.adapt=['head']"]
    with pytest.raises(ValueError, match="unrecognized arguments: --bogus 1"):
        dotted_overrides(["--bogus", "1"])
    with pytest.raises(ValueError, match="expected a value"):
        dotted_overrides(["--algorithm.inner_lr"])
    resolve_args = run_args_resolver()
    config = resolve_args(["--benchmark=synthetic-5w1s", "--algorithm=anil", "--seed=2", "--algorithm.inner_lr=0.2",
                           "--algorithm.adapt=['head']", "--trainer.max_time_minutes=None",
                           *set_flags(["trainer.max_steps=7", *local_run(Path("x"))])])
    assert (config.trainer.seed, config.algorithm.inner_lr, config.algorithm.adapt) == (2, 0.2, ["head"])
    assert config.trainer.max_time_minutes is None and config.trainer.max_steps == 7


# -- bad input ----------------------------------------------------------------------------------------------

_BAD = [
    (["grid", "run", "--benchmark", "nope"], "unknown benchmark 'nope'"),
    (["grid", "run"], "a grid needs at least one benchmark"),
    (["grid", "run", "--benchmark", "synthetic-5w1s", "--algorithm", "transfer"],
     "algorithm 'transfer' is defined by no preset of the grid's benchmarks"),
    (["grid", "run", "--benchmark", "synthetic-5w1s", "--preset", "paper"], "preset 'paper' is defined by none"),
    (["grid", "run", "--benchmark", "synthetic-5w1s", "--algorithm", "maml", "--vary",
      "algorithm.inner_lr=[0.1, fast]"],
     "cell synthetic-5w1s/maml/default algorithm.inner_lr=fast: algorithm.inner_lr: expected a number"),
    (["grid", "run", "--benchmark", "synthetic-5w1s", "--set", "algorithm.inner_rate=1"],
     "unknown key(s) algorithm.inner_rate"),
    (["grid", "run", "--benchmark", "synthetic-5w1s", "--seed", "1", "--seed", "1"], "seed 1 is listed twice"),
    (["grid", "run", "--benchmark", "synthetic-5w1s", "--vary", "logger=[none, csv]"],
     "expected a dotted configuration key"),
    (["grid", "run", "--benchmark", "synthetic-5w1s", "--vary", "algorithm.inner_lr=[0.1]", "--set",
      "algorithm.inner_lr=0.2"], "algorithm.inner_lr is both varied and set"),
    (["grid", "run", "--benchmark", "synthetic-5w1s", "--parallel", "0"], "--parallel must be >= 1"),
    (["grid", "run", "--benchmark", "synthetic-5w1s", "--algorithm", "maml", "--out-dir", "runs/{algorithm.lr}"],
     "{algorithm.lr} names no configuration value"),
    (["grid", "sweep", "--benchmark", "synthetic-5w1s", "--benchmark", "synthetic-seg-1w1s", "--algorithm", "maml",
      "--algorithm", "transfer"], "synthetic-5w1s/default: no 'transfer'"),
    (["grid", "sweep", "--benchmark", "synthetic-5w1s", "--benchmark", "synthetic-seg-1w1s"],
     "name the algorithms (--algorithm) so that every preset defines them"),
    (["grid", "run", "--benchmark", "synthetic-5w1s", "--algorithm", "maml", "--algorithm", "protonet", "--devices",
      "2", "--strategy", "ddp"], "cell synthetic-5w1s/protonet/default: protonet runs in one process"),
]


@pytest.mark.parametrize("argv, message", _BAD, ids=[
    "unknown-benchmark", "no-benchmark", "algorithm-nowhere", "preset-nowhere", "bad-value", "unknown-key",
    "duplicate-seed", "vary-not-dotted", "varied-and-set", "parallel-0", "bad-out-dir-field", "sweep-undefined",
    "sweep-union", "ddp-one-process-learner"])
def test_bad_input_fails_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str], argv: list[str],
                                              message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())  # no run folder, no record


def test_bad_grid_file_and_unknown_run_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("benchmark: synthetic-5w1s\nseeds: [1, 2]\n")
    assert main(["grid", "list", "--grid", str(grid)]) == 2
    assert "unknown key(s) seeds; valid: benchmark, preset, algorithm, seed" in capsys.readouterr().err
    assert main(["grid", "list", "--grid", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--algorithm=maml", "--bogus", "1"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["leaderboard", "--algorithm.inner_lr=1"])  # dotted flags belong to run and test only
    assert "unrecognized arguments" in capsys.readouterr().err

