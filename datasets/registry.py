"""The dataset registry: name -> how to load, prepare and verify it (:class:`DatasetInfo`).

Readers are imported lazily (``DatasetInfo.loader`` is a ``"module:function"`` name) so that ``metabench --help``
does not decode anything or import PIL-heavy code. Other packages add datasets through the entry-point group
``metabench.datasets`` (a :class:`DatasetInfo`, or a loader function) or by naming a loader directly:
``data.name: mypkg.data:load_mine`` (``metabench.core.registry``).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metabench.core.registry import Registry, RegistryError
from metabench.datasets.base import DatasetError, ImageSplit

# What a dataset is labelled for; the runner picks the problem (loss and metric) and checks the network by it.
CLASSIFICATION, SEGMENTATION = "classification", "segmentation"


@dataclass(frozen=True)
class DatasetInfo:
    """How to use one dataset. ``loader`` and ``verifier`` are ``"module:function"`` names of metabench.datasets'
    modules, or of any importable module. A loader is called as
    ``loader(split, cache_dir=..., [root=...,] **options)`` and returns an :class:`ImageSplit`."""

    name: str
    loader: str
    splits: tuple[str, ...]
    needs_root: bool
    verifier: str | None = None
    description: str = ""
    task: str = CLASSIFICATION  # or SEGMENTATION: splits carry masks, episodes per-pixel targets

    def _function(self, ref: str) -> Callable[..., Any]:
        module, _, function = ref.partition(":")
        inside = f"metabench.datasets.{module}"  # metabench's readers are named relative to metabench.datasets
        if "." not in module and importlib.util.find_spec(inside) is not None:
            module = inside
        return getattr(importlib.import_module(module), function)

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


def _check_dataset(name: str, obj: Any) -> DatasetInfo:
    """An entry point or a reference gives a DatasetInfo, or a loader function: then a dataset of splits train,
    val and test, whose loader receives ``root`` (``data.root``; None when unset)."""
    if isinstance(obj, DatasetInfo):
        return obj
    if callable(obj):
        reference = name if ":" in name else f"{obj.__module__}:{obj.__qualname__}"
        summary = (obj.__doc__ or "").strip().split("\n")[0]
        return DatasetInfo(name, reference, ("train", "val", "test"), True, description=summary)
    raise RegistryError(f"dataset {name!r} resolves to {obj!r}, neither a DatasetInfo nor a loader function")


# name -> DatasetInfo: the built-ins in this order, then the "metabench.datasets" entry points.
DATASETS: Registry[DatasetInfo] = Registry("dataset", "metabench.datasets", _check_dataset)
_BUILTIN = (
    DatasetInfo(
        "omniglot", "omniglot:load_omniglot", ("train", "val", "test", "trainval"), True, "omniglot:verify_omniglot",
        "Omniglot (Lake et al. 2015), 1,623 characters x 20 drawings, 28x28; schemes 'vinyals' and 'maml'"),
    DatasetInfo(
        "mini-imagenet", "miniimagenet:load_mini_imagenet", ("train", "val", "test"), True,
        "miniimagenet:verify_mini_imagenet",
        "mini-ImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 split), 100 classes x 600, 84x84 RGB"),
    DatasetInfo(
        "synthetic-glyphs", "synthetic:make_glyphs", ("train", "val", "test"), False, None,
        "generated Omniglot-like glyphs, deterministic from a seed, no download (the offline default)"),
    DatasetInfo(
        "synthetic-seg", "synthetic_seg:make_segmentation", ("train", "val", "test"), False, None,
        "generated textured objects on textured backgrounds with masks, deterministic from a seed, 64x64 by "
        "default, no download (the offline segmentation default)", task=SEGMENTATION),
    DatasetInfo(
        "fss-mini", "fss:load_fss_mini", ("train", "val", "test"), True, "fss:verify_fss_mini",
        "real image/mask pairs in the FSS-1000 layout (DAVIS, Weizmann horses, COCO, CamVid), 33 classes x 10, "
        "class split from its splits.json; 128x128 by default (option image_size)", task=SEGMENTATION),
    DatasetInfo(
        "fss-1000", "fss:load_fss_1000", ("train", "val", "test"), True, "fss:verify_fss_1000",
        "FSS-1000 (Li et al. 2020), 1,000 classes x 10 pairs, 520 / 240 / 240 class split, 224x224",
        task=SEGMENTATION),
    DatasetInfo(
        "pascal-5i", "pascal5i:load_pascal_5i", ("train", "val", "test"), True, "pascal5i:verify_pascal_5i",
        "PASCAL-5i (Shaban et al. 2017) on VOC 2012 + SBD, 4 folds of 5 classes (option fold), per-fold lists "
        "(option lists), 224x224 by default", task=SEGMENTATION),
)
for _info in _BUILTIN:
    DATASETS.register(_info.name, _info)


def get_dataset(name: str) -> DatasetInfo:
    """Dataset ``name``: built in, an entry point, or a ``package.module:loader`` reference."""
    try:
        return DATASETS.get(name)
    except RegistryError as error:
        raise DatasetError(str(error)) from None
