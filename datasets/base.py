"""Shared types of the data layer: a decoded split, its errors, and where data and caches live.

Every reader (Omniglot, mini-ImageNet, synthetic glyphs, ...) returns an :class:`ImageSplit`; the episode
sampler only ever sees that type, so it never knows file formats.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DATA_ENV = "METABENCH_DATA"
CACHE_ENV = "METABENCH_CACHE"


class DatasetError(ValueError):
    """A dataset cannot be read or an episode request cannot be met; the message says what and where."""


@dataclass(frozen=True)
class ImageSplit:
    """One split of a few-shot dataset, decoded to uint8 and grouped by class.

    Attributes:
        name: human-readable identity, e.g. ``"omniglot/vinyals/test"``; part of the episode digest.
        images: uint8 tensor ``[N, C, H, W]``; class ``k`` occupies rows ``offsets[k]:offsets[k+1]``.
        offsets: int64 array ``[K + 1]``, non-decreasing, ``offsets[0] == 0`` and ``offsets[-1] == N``.
        class_names: ``K`` stable class identities (e.g. ``"Gurmukhi/character42/rot090"``).
        image_ids: ``N`` stable image identities (e.g. ``"Gurmukhi/character42/0873_01.png@rot090"``).
        masks: segmentation splits only: uint8 ``[N, H, W]`` matching ``images`` row for row; 0 = background,
            1 = foreground of that row's class, 255 = ignore (e.g. PASCAL's object boundaries). ``None`` for
            classification splits.
    """

    name: str
    images: torch.Tensor
    offsets: np.ndarray
    class_names: tuple[str, ...]
    image_ids: tuple[str, ...] = field(repr=False)
    masks: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DatasetError(f"{self.name}: images must be uint8 [N, C, H, W], got {self.images.dtype} "
                               f"{tuple(self.images.shape)}")
        offsets = np.asarray(self.offsets, dtype=np.int64)
        object.__setattr__(self, "offsets", offsets)
        n = self.images.shape[0]
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
            raise DatasetError(f"{self.name}: offsets must run from 0 to {n} without decreasing")
        if len(self.class_names) != len(offsets) - 1:
            raise DatasetError(f"{self.name}: {len(self.class_names)} class names for {len(offsets) - 1} classes")
        if len(self.image_ids) != n:
            raise DatasetError(f"{self.name}: {len(self.image_ids)} image ids for {n} images")
        if self.masks is not None:
            _check_masks(self.name, self.masks, self.images.shape)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def counts(self) -> np.ndarray:
        """Images per class, int64 ``[K]``."""
        return np.diff(self.offsets)

    @property
    def labels(self) -> torch.Tensor:
        """Class index of every image, int64 ``[N]``."""
        return torch.from_numpy(np.repeat(np.arange(self.num_classes), self.counts))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> ImageSplit:
        """The same split with its images on ``device`` (e.g. resident on the GPU for episode gathering)."""
        masks = None if self.masks is None else self.masks.to(device)
        return ImageSplit(self.name, self.images.to(device), self.offsets, self.class_names, self.image_ids, masks)

    @property
    def is_segmentation(self) -> bool:
        return self.masks is not None


MASK_IGNORE = 255  # mask value excluded from segmentation losses and metrics
_MASK_CHECK_ROWS = 256  # rows per chunk when checking mask values: bounded temporaries on large splits


def _check_masks(name: str, masks: torch.Tensor, image_shape: torch.Size) -> None:
    """Masks must be uint8 ``[N, H, W]`` matching ``[N, C, H, W]`` images, with values in {0, 1, 255}."""
    expected = (image_shape[0], image_shape[2], image_shape[3])
    if masks.dtype != torch.uint8 or tuple(masks.shape) != expected:
        raise DatasetError(f"{name}: masks must be uint8 {list(expected)} to match the images, got {masks.dtype} "
                           f"{list(masks.shape)}")
    for start in range(0, masks.shape[0], _MASK_CHECK_ROWS):
        chunk = masks[start:start + _MASK_CHECK_ROWS]
        bad = (chunk > 1) & (chunk != MASK_IGNORE)
        if bool(bad.any()):
            row = start + int(bad.flatten(1).any(1).nonzero()[0, 0])
            value = int(chunk[row - start][bad[row - start]][0])
            raise DatasetError(f"{name}: mask of row {row} holds value {value}; masks may hold only 0 (background), "
                               f"1 (foreground) and {MASK_IGNORE} (ignore)")


def resolve_data_root(root: str | os.PathLike[str] | None, dataset: str) -> Path:
    """The folder holding ``dataset``'s files: ``root`` (or ``root/<dataset>`` when that exists) if given,
    else ``$METABENCH_DATA/<dataset>``.

    Raises:
        DatasetError: neither is set, or the folder does not exist; the message says where files go.
    """
    if root is None:
        env = os.environ.get(DATA_ENV)
        if not env:
            raise DatasetError(
                f"no data root for {dataset!r}: pass --data-root PATH (or root=...) or set ${DATA_ENV} to a folder "
                f"that holds {dataset}/ (see docs/data.md)")
        path = Path(env) / dataset
    else:
        path = Path(root)
        if (path / dataset).is_dir():  # the data folder that holds <dataset>/ was given
            path = path / dataset
    if not path.is_dir():
        raise DatasetError(f"{dataset}: data root {str(path)!r} does not exist or is not a folder "
                           f"(see docs/data.md for the accepted layouts)")
    return path


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Writable folder for extracted archives and prepared caches: ``cache_dir``, ``$METABENCH_CACHE`` or
    ``~/.cache/metabench``. Never beside the data, which may be read-only."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "metabench"
    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
