"""Standardized few-shot episodes: training episodes from a seeded generator, FIXED evaluation episodes, digests.

An episode picks ``ways`` classes of a split, relabels them 0..ways-1 in random order, and draws ``shots``
support and ``queries`` query images per class, disjoint. Support and query rows are label-major: rows
``l * shots : (l + 1) * shots`` of the support set carry label ``l``.

Evaluation episode ``i`` is a pure function of (split name, spec, seed, i): it is drawn with a counter-based
generator built on BLAKE2b, so it is identical on any machine, OS and Python / numpy / torch version.
Training episodes need speed rather than portability: they come from numpy's PCG64, vectorised over a batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from metabench.datasets.base import DatasetError, ImageSplit

DIGEST_VERSION = "metabench-episodes-v1"  # part of every fixed episode's key: bump only with a new digest set


@dataclass(frozen=True)
class EpisodeSpec:
    """Shape of an N-way K-shot episode: ``ways`` classes, ``shots`` support and ``queries`` query images each."""

    ways: int
    shots: int
    queries: int

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DatasetError(f"EpisodeSpec.{name} must be a positive integer, got {value!r}")

    @property
    def per_class(self) -> int:
        return self.shots + self.queries

    def __str__(self) -> str:
        return f"{self.ways}w{self.shots}s{self.queries}q"


@dataclass(frozen=True)
class EpisodeIndices:
    """Which images form a batch of ``T`` episodes: rows of ``ImageSplit.images``.

    Attributes:
        classes: int64 ``[T, ways]``; ``classes[t, l]`` is the split's class index that episode ``t`` labels ``l``.
        support: int64 ``[T, ways * shots]`` image rows, label-major.
        query: int64 ``[T, ways * queries]`` image rows, label-major.
    """

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray

    def __len__(self) -> int:
        return self.classes.shape[0]

    def slice(self, start: int, stop: int) -> EpisodeIndices:
        return EpisodeIndices(self.classes[start:stop], self.support[start:stop], self.query[start:stop])


@dataclass(frozen=True)
class MetaBatch:
    """A meta-batch of episodes as stacked tensors (images stay uint8 until the model normalises them).

    ``support_x`` ``[T, ways*shots, C, H, W]``, ``support_y`` ``[T, ways*shots]``, ``query_x``
    ``[T, ways*queries, C, H, W]``, ``query_y`` ``[T, ways*queries]``, ``classes`` ``[T, ways]``.

    Segmentation splits (``ImageSplit.masks`` set) give per-pixel targets instead: ``support_y``
    ``[T, ways*shots, H, W]`` and ``query_y`` ``[T, ways*queries, H, W]``, int64, 0 = background,
    ``label + 1`` on the foreground of an image whose episode label is ``label``, 255 = ignore.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor
    # Fixed evaluation episodes: each task's index in its episode set ``[T]`` (int64, on the host), so that what is
    # drawn per episode at test time (e.g. evaluation minibatches) does not depend on how episodes are batched.
    # None for training meta-batches.
    episodes: torch.Tensor | None = None

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MetaBatch:
        return MetaBatch(*(t.to(device, non_blocking=non_blocking) for t in
                           (self.support_x, self.support_y, self.query_x, self.query_y, self.classes)),
                         episodes=self.episodes)


class _CounterRng:
    """Portable generator: 64-bit words from BLAKE2b(key, counter). Slow but identical everywhere."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()
        self._counter = 0

    def _word(self) -> int:
        self._counter += 1
        digest = hashlib.blake2b(self._key + self._counter.to_bytes(8, "little"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def below(self, n: int) -> int:
        """Uniform integer in ``[0, n)`` by rejection (no modulo bias)."""
        limit = (1 << 64) - (1 << 64) % n
        while True:
            word = self._word()
            if word < limit:
                return word % n

    def sample(self, n: int, k: int) -> list[int]:
        """``k`` distinct integers of ``[0, n)`` in random order (partial Fisher-Yates on a sparse array)."""
        swapped: dict[int, int] = {}
        out = []
        for i in range(k):
            j = i + self.below(n - i)
            out.append(swapped.get(j, j))
            swapped[j] = swapped.get(i, i)
        return out


class EpisodeSampler:
    """Draws episodes of ``spec`` from ``split``; checks up front that every request can be met."""

    def __init__(self, split: ImageSplit, spec: EpisodeSpec) -> None:
        if spec.ways > split.num_classes:
            raise DatasetError(f"{split.name}: {spec.ways}-way episodes need {spec.ways} classes, "
                               f"the split has {split.num_classes}")
        counts = split.counts
        short = np.flatnonzero(counts < spec.per_class)
        if short.size:
            first = int(short[0])
            raise DatasetError(
                f"{split.name}: class {split.class_names[first]!r} has {int(counts[first])} images, fewer than "
                f"shots + queries = {spec.shots} + {spec.queries} = {spec.per_class}"
                + (f" ({short.size} classes are too small)" if short.size > 1 else ""))
        self.split = split
        self.spec = spec
        self._counts = counts
        self._offsets = split.offsets[:-1]
        self._fixed_cache: dict[tuple[int, int], EpisodeIndices] = {}
        self._mask_copies: dict[str, torch.Tensor] = {}  # device -> the split's masks resident there

    # -- training episodes: fast, seeded, vectorised -------------------------------------------------------

    def sample(self, rng: np.random.Generator, tasks: int) -> EpisodeIndices:
        """``tasks`` random episodes from ``rng`` (vectorised: no Python loop over episodes)."""
        ways, n = self.spec.ways, self.spec.per_class
        num_classes = self.split.num_classes
        # Random keys + partial sort = uniform sample without replacement, in a uniformly random order.
        keys = rng.random((tasks, num_classes))
        classes = _smallest(keys, ways)
        counts = self._counts[classes]  # [T, W]
        max_count = int(counts.max())
        image_keys = rng.random((tasks, ways, max_count))
        image_keys[np.arange(max_count) >= counts[..., None]] = np.inf  # never pick past a class's end
        picks = _smallest(image_keys.reshape(tasks * ways, max_count), n).reshape(tasks, ways, n)
        rows = picks + self._offsets[classes][..., None]
        return self._indices(classes, rows)

    # -- fixed evaluation episodes: pure functions of (split, spec, seed, i) --------------------------------

    def episode_key(self, seed: int, index: int) -> str:
        return f"{DIGEST_VERSION}|{self.split.name}|{self.spec}|seed={seed}|episode={index}"

    def fixed(self, seed: int, count: int, start: int = 0) -> EpisodeIndices:
        """Episodes ``start .. start+count-1`` of the fixed evaluation set named by ``seed``."""
        if count <= 0 or start < 0:
            raise DatasetError(f"fixed episodes need count > 0 and start >= 0, got count={count}, start={start}")
        cached = self._fixed_cache.get((seed, start, count))
        if cached is not None:
            return cached
        ways, n = self.spec.ways, self.spec.per_class
        classes = np.empty((count, ways), dtype=np.int64)
        rows = np.empty((count, ways, n), dtype=np.int64)
        for e in range(count):
            rng = _CounterRng(self.episode_key(seed, start + e))
            classes[e] = rng.sample(self.split.num_classes, ways)
            for label, cls in enumerate(classes[e]):
                rows[e, label] = np.asarray(rng.sample(int(self._counts[cls]), n)) + self._offsets[cls]
        result = self._indices(classes, rows)
        self._fixed_cache[(seed, start, count)] = result  # evaluation re-reads the same episodes every epoch
        return result

    def digest(self, seed: int, count: int) -> str:
        """sha256 over the class and image identities of fixed episodes ``0 .. count-1``: names the test set."""
        return episode_digest(self.split, self.spec, self.fixed(seed, count))

    # -- gathering ------------------------------------------------------------------------------------------

    def gather(self, indices: EpisodeIndices, images: torch.Tensor | None = None,
               masks: torch.Tensor | None = None) -> MetaBatch:
        """Stack the images of ``indices`` into a :class:`MetaBatch` on the device of ``images``.

        ``images`` defaults to the split's tensor; pass a device-resident copy to gather on the GPU. For a
        segmentation split, ``masks`` (default the split's) is gathered the same way, on its own device, and
        turned into per-pixel targets (see :class:`MetaBatch`).
        """
        if self.split.masks is not None:
            return self._gather_segmentation(indices, images, masks)
        images = self.split.images if images is None else images
        device = images.device
        tasks = len(indices)
        shape = images.shape[1:]
        if device.type == "cpu":
            # np.take is faster than torch's index_select here: torch page-faults a fresh output buffer on
            # every call (the measurement is in docs/performance.md).
            array = images.numpy()
            support_x = torch.from_numpy(np.take(array, indices.support.reshape(-1), axis=0))
            query_x = torch.from_numpy(np.take(array, indices.query.reshape(-1), axis=0))
        else:
            support_x = images.index_select(0, torch.as_tensor(indices.support.reshape(-1), device=device))
            query_x = images.index_select(0, torch.as_tensor(indices.query.reshape(-1), device=device))
        support_x = support_x.reshape(tasks, -1, *shape)
        query_x = query_x.reshape(tasks, -1, *shape)
        labels = torch.arange(self.spec.ways, device=device)
        support_y = labels.repeat_interleave(self.spec.shots).expand(tasks, -1)
        query_y = labels.repeat_interleave(self.spec.queries).expand(tasks, -1)
        classes = torch.as_tensor(indices.classes, device=device)
        return MetaBatch(support_x, support_y.contiguous(), query_x, query_y.contiguous(), classes)

    def _gather_segmentation(self, indices: EpisodeIndices, images: torch.Tensor | None,
                             masks: torch.Tensor | None) -> MetaBatch:
        images = self.split.images if images is None else images
        masks = self.split.masks if masks is None else masks
        assert masks is not None
        if masks.device != images.device:
            # Resident images were passed without their masks: copy the masks to that device once, not per batch.
            key = str(images.device)
            if key not in self._mask_copies:
                self._mask_copies[key] = masks.to(images.device)
            masks = self._mask_copies[key]
        device = images.device
        tasks = len(indices)
        support_x, query_x = _take(images, indices.support), _take(images, indices.query)
        support_m, query_m = _take(masks, indices.support), _take(masks, indices.query)
        labels = torch.arange(1, self.spec.ways + 1, device=device)  # foreground of episode label l -> l + 1
        support_y = _targets(support_m, labels.repeat_interleave(self.spec.shots))
        query_y = _targets(query_m, labels.repeat_interleave(self.spec.queries))
        classes = torch.as_tensor(indices.classes, device=device)
        return MetaBatch(support_x.reshape(tasks, -1, *images.shape[1:]),
                         support_y.reshape(tasks, -1, *masks.shape[1:]),
                         query_x.reshape(tasks, -1, *images.shape[1:]), query_y.reshape(tasks, -1, *masks.shape[1:]),
                         classes)

    def _indices(self, classes: np.ndarray, rows: np.ndarray) -> EpisodeIndices:
        tasks, ways = classes.shape
        shots = self.spec.shots
        return EpisodeIndices(classes.astype(np.int64),
                              np.ascontiguousarray(rows[:, :, :shots]).reshape(tasks, ways * shots),
                              np.ascontiguousarray(rows[:, :, shots:]).reshape(tasks, -1))


def _take(tensor: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Rows ``rows`` (any shape, flattened) of ``tensor``: np.take on the CPU (see ``gather``), else index_select."""
    flat = rows.reshape(-1)
    if tensor.device.type == "cpu":
        return torch.from_numpy(np.take(tensor.numpy(), flat, axis=0))
    return tensor.index_select(0, torch.as_tensor(flat, device=tensor.device))


def _targets(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """int64 per-pixel targets from uint8 masks ``[T*n, H, W]`` whose rows carry ``labels`` (tiled over tasks):
    1 -> the row's label, 0 and 255 unchanged."""
    rows = masks.shape[0]
    per_row = labels.repeat(rows // labels.numel()).view(rows, 1, 1)
    wide = masks.long()
    return torch.where(wide == 1, per_row, wide)


def _smallest(keys: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` smallest keys of each row, ordered by key (a uniformly random order)."""
    if k < keys.shape[1]:
        part = np.argpartition(keys, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(keys.shape[1]), keys.shape).copy()
    order = np.argsort(np.take_along_axis(keys, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def episode_digest(split: ImageSplit, spec: EpisodeSpec, indices: EpisodeIndices) -> str:
    """sha256 over (split, spec, and every episode's classes and support/query image identities)."""
    digest = hashlib.sha256(f"{DIGEST_VERSION}|{split.name}|{spec}|episodes={len(indices)}\n".encode())
    ids, names = split.image_ids, split.class_names
    shots, queries = spec.shots, spec.queries
    for e in range(len(indices)):
        for label, cls in enumerate(indices.classes[e]):
            support = indices.support[e, label * shots:(label + 1) * shots]
            query = indices.query[e, label * queries:(label + 1) * queries]
            line = "|".join([str(e), str(label), names[cls], ",".join(ids[i] for i in support),
                             ",".join(ids[i] for i in query)])
            digest.update(line.encode() + b"\n")
    return digest.hexdigest()
