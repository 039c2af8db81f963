"""``EpisodicDataModule``: meta-batches of episodes for Lightning, with fixed validation / test episodes.

Training batch ``g`` (the g-th optimizer step) is drawn from a generator seeded with ``(seed, g)``, so a run
resumed from a checkpoint at step ``g`` sees exactly the episodes an uninterrupted run would have seen.
With ``resident_device`` set, every split's images live on that device and episodes are gathered there:
no host-to-device copy and no DataLoader worker on the hot path.

Several processes (DDP, ``benchmarks/core/distributed.py``): rank ``r`` of ``W`` draws the SAME global meta-batch as one
process would and keeps its contiguous share of the tasks, so training does not depend on ``W``; the fixed
evaluation batches go round-robin (batch ``b`` to rank ``b % W``), each batch exactly as one process batches it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from metabench.core.distributed import round_robin, task_slice, world
from metabench.datasets.base import ImageSplit
from metabench.datasets.episodes import EpisodeSampler, EpisodeSpec, MetaBatch

SplitLoader = Callable[[str], ImageSplit]


class _TrainEpisodes(IterableDataset):
    """Endless meta-batches; batch ``g`` depends only on ``(seed, g)``; ``share``: this rank's tasks of it."""

    def __init__(self, module: EpisodicDataModule, share: slice) -> None:
        self.module, self.share = module, share

    def __iter__(self) -> Iterator[MetaBatch]:
        module = self.module
        step = module.start_step
        while True:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([module.seed, step])))
            indices = module.train_sampler.sample(rng, module.meta_batch)
            yield module.train_sampler.gather(indices.slice(self.share.start, self.share.stop),
                                              module._images["train"])
            step += 1


class _FixedEpisodes(IterableDataset):
    """The fixed evaluation episodes of one split, in chunks of ``batch`` tasks; rank ``rank`` of ``size``
    yields chunks ``rank, rank + size, ...``."""

    def __init__(self, sampler: EpisodeSampler, images: torch.Tensor, seed: int, count: int, batch: int,
                 rank: int = 0, size: int = 1) -> None:
        self.sampler, self.images, self.seed, self.count, self.batch = sampler, images, seed, count, batch
        self.chunks = round_robin(-(-count // batch), rank, size)

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[MetaBatch]:
        indices = self.sampler.fixed(self.seed, self.count)
        for chunk in self.chunks:
            start = chunk * self.batch
            batch = self.sampler.gather(indices.slice(start, start + self.batch), self.images)
            yield dataclasses.replace(batch, episodes=torch.arange(start, start + batch.tasks))


class EpisodicDataModule(L.LightningDataModule):
    """Episodes of one benchmark: random training meta-batches, fixed validation and test episodes.

    Args:
        load_split: ``split name -> ImageSplit`` (e.g. ``functools.partial(load_omniglot, root=...)``).
        spec: evaluation episode shape (``queries`` per class are scored).
        meta_batch: tasks per training step.
        train_spec: training episode shape if it differs (e.g. Reptile trains with more shots); default ``spec``.
        seed: training episode seed; ``eval_seed`` names the fixed validation/test episodes (and their digest).
        val_episodes / test_episodes: number of fixed episodes (``val_episodes`` 0: no validation, e.g. Reptile's
            Omniglot split holds none); ``eval_batch``: tasks per evaluation batch.
        splits: names of the (train, val, test) splits.
        resident_device: keep all images on this device and gather there (``None``: stay on the host).
    """

    def __init__(self, load_split: SplitLoader, spec: EpisodeSpec, meta_batch: int, *,
                 train_spec: EpisodeSpec | None = None, seed: int = 0, eval_seed: int = 0,
                 val_episodes: int = 100, test_episodes: int = 600, eval_batch: int = 25,
                 splits: tuple[str, str, str] = ("train", "val", "test"),
                 resident_device: str | torch.device | None = None) -> None:
        super().__init__()
        if meta_batch <= 0 or eval_batch <= 0 or val_episodes < 0 or test_episodes <= 0:
            raise ValueError("meta_batch, eval_batch and test_episodes must be positive and val_episodes >= 0 (0: no "
                             f"validation), got {meta_batch}, {eval_batch}, {test_episodes}, {val_episodes}")
        self.load_split = load_split
        self.spec = spec
        self.train_spec = train_spec or spec
        self.meta_batch = meta_batch
        self.seed, self.eval_seed = seed, eval_seed
        self.val_episodes, self.test_episodes, self.eval_batch = val_episodes, test_episodes, eval_batch
        self.split_names = dict(zip(("train", "val", "test"), splits, strict=True))
        self.resident_device = resident_device
        self.start_step = 0
        self._samplers: dict[str, EpisodeSampler] = {}
        self._images: dict[str, torch.Tensor] = {}

    def sampler(self, role: str) -> EpisodeSampler:
        """The sampler of ``role`` (train / val / test), loading its split on first use."""
        if role not in self._samplers:
            split = self.load_split(self.split_names[role])
            spec = self.train_spec if role == "train" else self.spec
            self._samplers[role] = EpisodeSampler(split, spec)  # checks the request before any training
            images = split.images
            if self.resident_device is not None:
                images = images.to(self.resident_device)
            self._images[role] = images
        return self._samplers[role]

    @property
    def train_sampler(self) -> EpisodeSampler:
        return self.sampler("train")

    def setup(self, stage: str | None = None) -> None:
        if self.resident_device is not None and self.trainer is not None:
            # Several GPUs: each process keeps its copy on its own device, known only once Lightning has set up.
            self.resident_device = self.trainer.strategy.root_device
            self._images = {role: images.to(self.resident_device) for role, images in self._images.items()}
        roles = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "",
                                                                                      ("train", "val", "test"))
        for role in roles:
            if role != "val" or self.validates:
                self.sampler(role)

    @property
    def validates(self) -> bool:
        """Whether there are validation episodes (``val_episodes: 0``: none, the split need not exist)."""
        return self.val_episodes > 0

    def digest(self, role: str = "test") -> str:
        count = self.test_episodes if role == "test" else self.val_episodes
        return self.sampler(role).digest(self.eval_seed, count)

    def train_dataloader(self) -> DataLoader:
        self.sampler("train")
        rank, size = world()
        return DataLoader(_TrainEpisodes(self, task_slice(self.meta_batch, rank, size)), batch_size=None)

    def _fixed(self, role: str, count: int) -> DataLoader:
        sampler = self.sampler(role)
        rank, size = world()
        chunks = -(-count // self.eval_batch)
        if chunks < size:  # a rank without a batch would skip the evaluation and never join the gather
            raise ValueError(f"{count} {role} episodes in batches of {self.eval_batch} make {chunks} batch(es), "
                             f"fewer than the {size} processes: lower episodes.eval_batch to at most "
                             f"{count // size}")
        return DataLoader(_FixedEpisodes(sampler, self._images[role], self.eval_seed, count, self.eval_batch,
                                         rank, size), batch_size=None)

    def val_dataloader(self) -> DataLoader | list:
        return self._fixed("val", self.val_episodes) if self.validates else []  # Lightning: no validation batches

    def test_dataloader(self) -> DataLoader:
        return self._fixed("test", self.test_episodes)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device) if isinstance(batch, MetaBatch) else super().transfer_batch_to_device(
            batch, device, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        # The next training batch is the one for the current optimizer step.
        step = self.trainer.global_step if self.trainer is not None else self.start_step
        return {"start_step": int(step), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_step = int(state_dict["start_step"])
