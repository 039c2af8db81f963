"""Several processes (DDP): the meta-batch split and the meta-gradient are exactly the single-process ones.

- Pure pieces (no process): task shares, round-robin evaluation batches, the data module's shards.
- Two real gloo processes (``torch.multiprocessing``), float64: one training step of every algorithm with an
  uneven split (3 tasks over 2 ranks) gives the single-process gradient (<= 1e-10 relative).
- The real command, ``python -m metabench run --devices 2 --strategy ddp``: same digest, per-episode scores and
  weights as one process, one record and one W&B run; resuming a 1-process checkpoint with 2 processes too.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metabench.core.distributed import broadcast_object, gather_in_order, round_robin, task_slice
from metabench.datasets.episodes import MetaBatch
from metabench.models.learners import algorithms_that
from metabench.run.config import ConfigError
from metabench.run.records import read_record
from metabench.run.runner import _prepare, run, world_size
from tests.helpers import TINY_RUN, first_meta_batch, rel_err, set_flags, tiny_config

ALGORITHMS = algorithms_that("ddp_exact")
pytestmark = [  # the float64 step below calls training_step without a Trainer (no logger, a stand-in optimizer)
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
    pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before"),
]


# -- the pure pieces ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("tasks", "size"), [(t, w) for t in (2, 3, 4, 5, 7, 32) for w in (1, 2, 3) if t >= w])
def test_task_slices_tile_the_meta_batch_in_order(tasks: int, size: int) -> None:
    shares = [task_slice(tasks, r, size) for r in range(size)]
    assert [i for s in shares for i in range(tasks)[s]] == list(range(tasks))
    sizes = [s.stop - s.start for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # the first ranks take the extra


def test_world_larger_than_the_meta_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="meta-batch of 2 task.*3 processes.*at most 2"):
        task_slice(2, 0, 3)
    config = tiny_config(Path("/unused"), "maml", extra=["trainer.devices=8", "trainer.strategy=ddp"])
    with pytest.raises(ConfigError, match="meta-batch of 4 task.*8 processes"):
        world_size(config)
    with pytest.raises(ConfigError, match="need --strategy ddp"):
        world_size(tiny_config(Path("/unused"), "maml", extra=["trainer.devices=2"]))
    with pytest.raises(ConfigError, match="trainer.strategy must be one of auto, ddp"):
        world_size(tiny_config(Path("/unused"), "maml", extra=["trainer.strategy=fsdp"]))
    for name in ("protonet", "baseline", "baseline++"):  # whole-batch statistics / early stopping: one process
        with pytest.raises(ConfigError, match=f"{re.escape(name)} runs in one process"):
            world_size(tiny_config(Path("/unused"), name, extra=["trainer.devices=2", "trainer.strategy=ddp"]))


def test_round_robin_and_gather_order() -> None:
    assert [list(round_robin(5, r, 2)) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert gather_in_order(["a", "b"], size=1) == ["a", "b"]


def test_each_rank_draws_its_share_of_the_same_global_meta_batch(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import metabench.datasets.datamodule as datamodule

    config = tiny_config(tmp_path, "maml", extra=["algorithm.meta_batch=3"])
    _, dm, _, _ = _prepare(config)
    full = first_meta_batch(dm)
    single_test = list(dm.test_dataloader())  # 20 test episodes in batches of 10
    assert len(single_test) == 2
    for rank, part in ((0, slice(0, 2)), (1, slice(2, 3))):  # 3 tasks over 2 ranks: 2 + 1
        monkeypatch.setattr(datamodule, "world", lambda rank=rank: (rank, 2))
        batch = next(iter(dm.train_dataloader()))
        expected = {f.name: getattr(full, f.name)[part] for f in dataclasses.fields(MetaBatch)
                    if isinstance(getattr(full, f.name), torch.Tensor)}
        assert batch.support_x.shape[0] == part.stop - part.start
        assert all(torch.equal(getattr(batch, name), value) for name, value in expected.items())
        chunks = list(dm.test_dataloader())  # round-robin: rank r evaluates batch r
        assert len(chunks) == 1 and torch.equal(chunks[0].query_x, single_test[rank].query_x)
    monkeypatch.setattr(datamodule, "world", lambda: (0, 3))
    with pytest.raises(ValueError, match="2 batch\\(es\\), fewer than the 3 processes"):
        dm.test_dataloader()


# -- two real processes, float64 --------------------------------------------------------------------------------

def _float64(batch: MetaBatch) -> MetaBatch:
    """Images as float64 in [0, 1] (the problem passes float inputs through), for exact comparisons."""
    return dataclasses.replace(batch, support_x=batch.support_x.double() / 255, query_x=batch.query_x.double() / 255)


class _Recorder:
    """Stands in for the Lightning optimizer of a manual-optimization step: keeps the gradients it is given."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.grads = module, None

    def zero_grad(self) -> None:
        self.module.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.grads = {k: p.grad.detach().clone() for k, p in self.module.named_parameters() if p.grad is not None}


def _one_step_gradients(config, batch: MetaBatch | None) -> dict[str, torch.Tensor]:
    """The meta-gradient that one training step of ``config``'s module hands its optimizer (after the sync),
    on ``batch`` (default: this process's share of the first meta-batch)."""
    _, dm, module, _ = _prepare(config)
    module.double()
    batch = _float64(batch if batch is not None else next(iter(dm.train_dataloader())))
    recorder = _Recorder(module)
    module.optimizers = lambda: recorder  # manual optimization (Reptile, chunked MAML) steps through it
    module.lr_schedulers = lambda: torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)]), lambda s: 1)
    loss = module.training_step(batch, 0)
    if loss is not None:  # automatic optimization: Lightning's backward, then the hook, then the step
        loss.backward()
        module.on_after_backward()
        recorder.step()
    return recorder.grads


def _configs(root: Path) -> dict[str, object]:
    extra = ["algorithm.meta_batch=3", "algorithm.engine=sequential"]
    configs = {name: tiny_config(root, name, extra=extra) for name in ALGORITHMS}
    configs["maml-chunked"] = tiny_config(root, "maml", extra=[*extra, "algorithm.task_chunk=1"])
    return configs


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        grads = {name: _one_step_gradients(config, None) for name, config in _configs(Path(root)).items()}
        grads["broadcast"] = broadcast_object(f"rank {rank}'s choice")  # what "auto" does with rank 0's engine
        grads["gathered"] = gather_in_order([f"r{rank}i{i}" for i in range(2 - rank)])  # 3 items, round-robin
        torch.save(grads, Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_single_process_meta_gradient(tmp_path: Path) -> None:
    """3 tasks over 2 ranks (2 + 1: the uneven split is weighted), every algorithm, float64."""
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["broadcast"] for r in ranks] == ["rank 0's choice"] * 2
    assert [r["gathered"] for r in ranks] == [["r0i0", "r1i0", "r0i1"]] * 2  # global items 0, 1, 2
    for name, config in _configs(tmp_path).items():
        _, dm, _, _ = _prepare(config)
        reference = _one_step_gradients(config, first_meta_batch(dm))
        for r in range(2):
            assert ranks[r][name].keys() == reference.keys(), name
            err = rel_err([ranks[r][name][k] for k in reference], list(reference.values()))
            assert err <= 1e-10, f"{name}, rank {r}: relative error {err:.2e}"


# -- the real command ------------------------------------------------------------------------------------------

STEPS = 20
# Conv biases feed batch norm, which subtracts every channel's mean: their meta-gradient is zero in exact
# arithmetic, so Adam walks them on float32 rounding noise (+-lr per step, whatever the number of processes).
# They do not change any output; every other weight must agree.
_NOISE_ONLY = ("features.0.0.bias", "features.1.0.bias", "features.2.0.bias", "features.3.0.bias")


# Over TINY_RUN: 3 tasks (2 + 1 per rank), 4 test batches (2 per rank), one engine for every run compared ("auto"
# times the engines afresh in each run and may pick another on a loaded machine; they agree only to rounding).
RUN = ["algorithm.meta_batch=3", "episodes.eval_batch=5", "trainer.cpu_threads=1", "trainer.checkpoint_every=10",
       "trainer.val_every=10", "algorithm.engine=sequential"]


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "metabench", "run", "--algorithm", "maml", "--quiet", "--accelerator", "cpu",
            "--out-dir", str(out / "runs"), "--records-dir", str(out / "records"), *set_flags([*TINY_RUN, *RUN]),
            *extra]


def _in_process(out: Path, steps: int) -> None:
    """The same run as :func:`_cli`'s, in this process (one process, no launcher)."""
    run(tiny_config(out, "maml", steps=steps, extra=RUN), progress=False)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "runs" / "synthetic-5w1s" / "maml-default-seed0" / "checkpoints" / "last.ckpt",
                      map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    return ckpt["state_dict"]


def _assert_same_run(out: Path, reference: Path, processes: int) -> None:
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == 1, records  # rank 0 alone writes
    ours, ref = read_record(records[0]), read_record(next((reference / "records").glob("*.json")))
    assert ours.episode_digest == ref.episode_digest and ours.training_steps == ref.training_steps == STEPS
    assert ours.scores == pytest.approx(ref.scores, abs=1e-6)
    assert ours.baseline == pytest.approx(ref.baseline, abs=1e-6)
    assert [p[2] for p in ours.curve] == pytest.approx([p[2] for p in ref.curve], abs=1e-6)
    assert ours.config["resolved"]["processes"] == processes and ours.device.endswith(f"x {processes} processes")
    a, b = _weights(out), _weights(reference)
    for key in a:
        if not key.endswith(_NOISE_ONLY):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one")
    _in_process(out, STEPS)
    return out


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_DIR": str(tmp), "WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_CACHE_DIR": str(tmp)}


@pytest.mark.slow  # two launches of the real command, ~15-25 s each on 2 cores
def test_two_process_run_equals_the_one_process_run(tmp_path: Path, one_process: Path) -> None:
    """`metabench run --devices 2 --strategy ddp`: one record, equal to one process's; one W&B run."""
    cmd = _cli(tmp_path, "--max-steps", str(STEPS), "--devices", "2", "--strategy", "ddp", "--logger", "wandb")
    done = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("record: ") == 1  # rank 0 alone reports
    _assert_same_run(tmp_path, one_process, processes=2)
    runs = list(tmp_path.glob("runs/**/offline-run-*"))
    assert len(runs) == 1, runs


@pytest.mark.slow
def test_resume_with_another_number_of_processes(tmp_path: Path, one_process: Path) -> None:
    """10 steps in one process (in this one), then --resume to 20 with two: the uninterrupted run's result."""
    _in_process(tmp_path / "first", STEPS // 2)
    (tmp_path / "first" / "runs").rename(tmp_path / "runs")  # the run folder; its record stays behind
    cmd = _cli(tmp_path, "--max-steps", str(STEPS), "--devices", "2", "--strategy", "ddp", "--resume")
    done = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(tmp_path, one_process, processes=2)
    # The record says how each training session ran: steps 0-10 in 1 process, then 2 processes (1 thread each).
    record = read_record(next((tmp_path / "records").glob("*.json")))
    assert record.execution["training"] == [[0, 1, 1], [STEPS // 2, 2, 1]] and record.execution["processes"] == 2
