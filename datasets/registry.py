"""The dataset registry: a plain dict from name to how to load, prepare and verify it.

Readers are imported lazily so that ``metabench --help`` does not decode anything or import PIL-heavy code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metabench.datasets.base import DatasetError, ImageSplit

# What a dataset is labelled for; the runner picks the problem (loss and metric) and checks the network by it.
CLASSIFICATION, SEGMENTATION = "classification", "segmentation"


@dataclass(frozen=True)
class DatasetInfo:
    """How to use one dataset. ``loader`` etc. are ``"module:function"`` names inside metabench.datasets."""

    name: str
    loader: str
    splits: tuple[str, ...]
    needs_root: bool
    verifier: str | None = None
    description: str = ""
    task: str = CLASSIFICATION  # or SEGMENTATION: splits carry masks, episodes per-pixel targets

    def _function(self, ref: str) -> Callable[..., Any]:
        module, _, function = ref.partition(":")
        return getattr(importlib.import_module(f"metabench.datasets.{module}"), function)

    def load(self, split: str, root: str | Path | None = None, cache_dir: str | Path | None = None,
             **options: Any) -> ImageSplit:
        """Split ``split``; ``root`` goes to readers of files only, ``cache_dir`` to every loader (generated sets
        cache their images too)."""
        if split not in self.splits:
            raise DatasetError(f"{self.name}: unknown split {split!r}; valid: {', '.join(self.splits)}")
        if self.needs_root:
            options["root"] = root
        return self._function(self.loader)(split, cache_dir=cache_dir, **options)

    def verify(self, root: str | Path | None = None) -> dict[str, Any]:
        if self.verifier is None:
            raise DatasetError(f"{self.name} is generated, there are no files to verify")
        return self._function(self.verifier)(root)


DATASETS: dict[str, DatasetInfo] = {
    "omniglot": DatasetInfo(
        "omniglot", "omniglot:load_omniglot", ("train", "val", "test", "trainval"), True, "omniglot:verify_omniglot",
        "Omniglot (Lake et al. 2015), 1,623 characters x 20 drawings, 28x28; schemes 'vinyals' and 'maml'"),
    "mini-imagenet": DatasetInfo(
        "mini-imagenet", "miniimagenet:load_mini_imagenet", ("train", "val", "test"), True,
        "miniimagenet:verify_mini_imagenet",
        "mini-ImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 split), 100 classes x 600, 84x84 RGB"),
    "synthetic-glyphs": DatasetInfo(
        "synthetic-glyphs", "synthetic:make_glyphs", ("train", "val", "test"), False, None,
        "generated Omniglot-like glyphs, deterministic from a seed, no download (the offline default)"),
    "synthetic-seg": DatasetInfo(
        "synthetic-seg", "synthetic_seg:make_segmentation", ("train", "val", "test"), False, None,
        "generated textured objects on textured backgrounds with masks, deterministic from a seed, 64x64 by "
        "default, no download (the offline segmentation default)", task=SEGMENTATION),
    "fss-mini": DatasetInfo(
        "fss-mini", "fss:load_fss_mini", ("train", "val", "test"), True, "fss:verify_fss_mini",
        "real image/mask pairs in the FSS-1000 layout (DAVIS, Weizmann horses, COCO, CamVid), 33 classes x 10, "
        "class split from its splits.json; 128x128 by default (option image_size)", task=SEGMENTATION),
    "fss-1000": DatasetInfo(
        "fss-1000", "fss:load_fss_1000", ("train", "val", "test"), True, "fss:verify_fss_1000",
        "FSS-1000 (Li et al. 2020), 1,000 classes x 10 pairs, 520 / 240 / 240 class split, 224x224",
        task=SEGMENTATION),
    "pascal-5i": DatasetInfo(
        "pascal-5i", "pascal5i:load_pascal_5i", ("train", "val", "test"), True, "pascal5i:verify_pascal_5i",
        "PASCAL-5i (Shaban et al. 2017) on VOC 2012 + SBD, 4 folds of 5 classes (option fold), per-fold lists "
        "(option lists), 224x224 by default", task=SEGMENTATION),
}


def get_dataset(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
