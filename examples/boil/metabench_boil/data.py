"""``blocks``: a generated few-shot dataset, registered from outside metabench.

Class ``k`` of a split is a random 4x4 binary pattern (drawn from ``(seed, split, k)``); its images are that
pattern scaled to the image size, shifted by up to 3 pixels and overlaid with noise. Deterministic, no files.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from metabench.datasets.base import DatasetError, ImageSplit
from metabench.datasets.registry import DatasetInfo

SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


def load_blocks(split: str, seed: int = 0, images_per_class: int = 10, image_size: int = 28,
                cache_dir: str | os.PathLike[str] | None = None) -> ImageSplit:
    """One split of ``blocks`` (``cache_dir`` unused: generating it takes milliseconds)."""
    if split not in SPLIT_CLASSES:
        raise DatasetError(f"blocks: unknown split {split!r}; valid: {', '.join(SPLIT_CLASSES)}")
    if images_per_class < 1 or image_size < 8 or seed < 0:
        raise DatasetError(f"blocks: need images_per_class >= 1, image_size >= 8, seed >= 0; got "
                           f"{images_per_class}, {image_size}, {seed}")
    classes = SPLIT_CLASSES[split]
    images = np.empty((classes * images_per_class, 1, image_size, image_size), dtype=np.uint8)
    cell = -(-image_size // 4)
    for k in range(classes):
        rng = np.random.default_rng([seed, SPLIT_INDEX[split], k])
        pattern = np.kron(rng.integers(0, 2, (4, 4)), np.ones((cell, cell)))[:image_size, :image_size]
        for i in range(images_per_class):
            shifted = np.roll(pattern, tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
            noisy = 200 * shifted + rng.integers(0, 56, shifted.shape)
            images[k * images_per_class + i, 0] = noisy.astype(np.uint8)
    names = tuple(f"blocks/s{seed}/{split}/{k:03d}" for k in range(classes))
    return ImageSplit(f"blocks/s{seed}/{split}", torch.from_numpy(images),
                      np.arange(classes + 1, dtype=np.int64) * images_per_class, names,
                      tuple(f"{name}/{i:02d}" for name in names for i in range(images_per_class)))


BLOCKS = DatasetInfo("blocks", "metabench_boil.data:load_blocks", ("train", "val", "test"), False,
                     description="generated 4x4 block patterns, shifted and noisy (metabench-boil example)")
