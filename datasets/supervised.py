"""Ordinary (non-episodic) training mini-batches for supervised pre-training, next to the fixed evaluation episodes.

:class:`SupervisedDataModule` is an :class:`~metabench.datasets.datamodule.EpisodicDataModule` whose training loader
yields :class:`LabelledBatch` es instead of meta-batches: ``batch_size`` images of the training split with their
class indices in that split (``ImageSplit.labels``: 0 .. K-1, the same class always the same label), drawn without
replacement from a shuffled copy of the split, epoch after epoch (the last incomplete batch of an epoch is dropped:
with batch statistics a batch of one image would normalise to nothing). Validation and test are the parent's fixed
episodes, so a pre-trained network is evaluated on exactly the episodes every other algorithm sees.

Reproducible and resumable like the episodic loader: epoch ``e``'s order is drawn from ``(seed, e)`` and batch ``g``'s
augmentation from ``(seed, g)``, so a resumed run continues with the batches an uninterrupted one would have drawn.

Augmentation (``augment=True``), the pre-training augmentation of Chen et al. 2019 (github.com/wyharveychen/
CloserLookFewShot data/datamgr.py ``get_composed_transform(aug=True)``: ``['RandomSizedCrop', 'ImageJitter',
'RandomHorizontalFlip', 'ToTensor', 'Normalize']``, jitter ``dict(Brightness=0.4, Contrast=0.4, Color=0.4)``),
applied per image on uint8 tensors:

1. random resized crop back to the image's size: area fraction U(0.08, 1), aspect ratio log-uniform in
   [3/4, 4/3], up to 10 tries, else the whole image (torchvision's ``RandomResizedCrop`` rule), bilinear;
2. colour jitter, in that order: brightness, contrast, saturation ("Color"), each by a factor 1 + 0.4 * U(-1, 1)
   (``data/additional_transforms.py`` ``ImageJitter``); saturation only for colour images;
3. horizontal flip with probability 1/2.

The ImageNet mean/std normalisation of the authors' code is left out: every metabench network sees uint8 / 255.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, IterableDataset

from metabench.datasets.datamodule import EpisodicDataModule, SplitLoader
from metabench.datasets.episodes import EpisodeSpec

_ORDER_TAG = 0x6F726472  # "ordr": epoch orders, apart from any other stream of the same seed
_AUGMENT_TAG = 0x61756731  # "aug1"
CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults (the authors' RandomSizedCrop)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = 0.4  # ImageJitter(Brightness=0.4, Contrast=0.4, Color=0.4)


@dataclass(frozen=True)
class LabelledBatch:
    """Images uint8 ``[B, C, H, W]`` and their class index in the training split, int64 ``[B]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LabelledBatch:
        return LabelledBatch(self.images.to(device, non_blocking=non_blocking),
                             self.labels.to(device, non_blocking=non_blocking))


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The shuffled row order of epoch ``epoch`` (a pure function of ``(seed, epoch)``)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, _ORDER_TAG])))
    return rng.permutation(size)


def _crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: torchvision's ``RandomResizedCrop.get_params`` rule."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width  # the ratio range holds the square image: the fallback is the whole image


def augment_images(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Chen et al.'s pre-training augmentation (module docstring) of uint8 ``[B, C, H, W]`` -> uint8, same shape."""
    out = []
    height, width = images.shape[-2:]
    for image in images:
        top, left, h, w = _crop_box(rng, height, width)
        image = TF.resized_crop(image, top, left, h, w, [height, width], antialias=True)
        factors = 1.0 + JITTER * (2.0 * rng.random(3) - 1.0)
        image = TF.adjust_brightness(image, float(factors[0]))
        image = TF.adjust_contrast(image, float(factors[1]))
        if image.shape[0] == 3:
            image = TF.adjust_saturation(image, float(factors[2]))
        if rng.random() < 0.5:
            image = TF.horizontal_flip(image)
        out.append(image)
    return torch.stack(out)


class _LabelledBatches(IterableDataset):
    """Endless mini-batches of the training split; batch ``g`` depends only on ``(seed, g)``."""

    def __init__(self, module: SupervisedDataModule) -> None:
        self.module = module

    def __iter__(self) -> Iterator[LabelledBatch]:
        module = self.module
        images = module._images["train"]
        labels = module.train_sampler.split.labels.to(images.device)
        size, batch = images.shape[0], module.batch_size
        per_epoch = size // batch
        step, epoch, order = module.start_step, None, None
        while True:
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                order = torch.from_numpy(epoch_order(module.seed, epoch, size)).to(images.device)
            rows = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
            x = images.index_select(0, rows)
            if module.augment:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([module.seed, step, _AUGMENT_TAG])))
                x = augment_images(x, rng)
            yield LabelledBatch(x, labels.index_select(0, rows))
            step += 1


class SupervisedDataModule(EpisodicDataModule):
    """Training: :class:`LabelledBatch` es of ``batch_size`` images of the training split (see the module
    docstring); validation and test: the parent's fixed episodes of ``spec``.

    Args:
        batch_size: images per training batch; at most the training split's size.
        augment: apply :func:`augment_images` to every training batch.
        Everything else: as :class:`EpisodicDataModule` (``meta_batch`` and ``train_spec`` only size the episodic
        sampler of the training split, which checks that it can be read; no training episode is drawn).
    """

    def __init__(self, load_split: SplitLoader, spec: EpisodeSpec, meta_batch: int, *, batch_size: int,
                 augment: bool = False, **kwargs: Any) -> None:
        super().__init__(load_split, spec, meta_batch, **kwargs)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.augment = batch_size, augment

    def train_dataloader(self) -> DataLoader:
        split = self.train_sampler.split
        if split.images.shape[0] < self.batch_size:
            raise ValueError(f"{split.name}: {split.images.shape[0]} images, fewer than one batch of "
                             f"{self.batch_size}")
        return DataLoader(_LabelledBatches(self), batch_size=None)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, LabelledBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
