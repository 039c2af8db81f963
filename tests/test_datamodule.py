"""EpisodicDataModule: stacked meta-batches, fixed evaluation episodes, resumable training stream."""

from __future__ import annotations

import functools
from itertools import islice

import pytest
import torch

from metabench.datasets.datamodule import EpisodicDataModule
from metabench.datasets.episodes import EpisodeSpec
from metabench.datasets.synthetic import make_glyphs

LOAD = functools.partial(make_glyphs, seed=0, num_classes=30)


def module(**kwargs) -> EpisodicDataModule:
    args = {"val_episodes": 7, "test_episodes": 12, "eval_batch": 5, **kwargs}
    return EpisodicDataModule(LOAD, EpisodeSpec(5, 1, 3), 4, **args)


def test_train_batches_are_stacked_tensors() -> None:
    dm = module()
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.support_x.dtype == torch.uint8
    assert batch.query_x.shape == (4, 15, 1, 28, 28)
    assert batch.support_y.shape == (4, 5) and batch.query_y.shape == (4, 15)


def test_eval_loaders_cover_the_fixed_episodes_in_chunks() -> None:
    dm = module()
    test = list(dm.test_dataloader())
    assert [b.tasks for b in test] == [5, 5, 2]
    again = list(dm.test_dataloader())
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(test, again, strict=True))
    assert [b.tasks for b in dm.val_dataloader()] == [5, 2]
    assert dm.digest("test") != dm.digest("val")


def test_training_stream_resumes_at_a_step() -> None:
    """Batch g depends only on (seed, g): a module restored at step 3 continues the same stream."""
    full = [b.support_x for b in islice(iter(module(seed=5).train_dataloader()), 6)]
    resumed = module(seed=5)
    resumed.load_state_dict({"start_step": 3, "seed": 5})
    tail = [b.support_x for b in islice(iter(resumed.train_dataloader()), 3)]
    assert all(torch.equal(a, b) for a, b in zip(full[3:], tail, strict=True))
    other = next(iter(module(seed=6).train_dataloader())).support_x
    assert not torch.equal(full[0], other)


def test_resident_device_gathers_there() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dm = module(resident_device=device)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.device.type == device
    reference = next(iter(module().train_dataloader()))
    assert torch.equal(batch.support_x.cpu(), reference.support_x)


def test_train_spec_can_differ() -> None:
    dm = module(train_spec=EpisodeSpec(5, 4, 2))
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape[1] == 20 and batch.query_x.shape[1] == 10
    assert next(iter(dm.test_dataloader())).support_x.shape[1] == 5


@pytest.mark.parametrize("kwargs", [{"val_episodes": -1}, {"test_episodes": -1}, {"eval_batch": 0}])
def test_bad_sizes_rejected(kwargs) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        module(**kwargs)


def test_no_validation_episodes_means_no_validation_split_is_read() -> None:
    """``val_episodes: 0`` (Reptile's Omniglot split holds no validation characters): the val split is never
    loaded and Lightning gets no validation batches."""
    loaded = []
    dm = module(val_episodes=0)
    original = dm.load_split
    dm.load_split = lambda name: loaded.append(name) or original(name)
    dm.setup("fit")
    assert not dm.validates and dm.val_dataloader() == [] and "val" not in loaded
