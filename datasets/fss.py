"""FSS-1000 (Li et al., CVPR 2020) and fss-mini: few-shot segmentation sets in the FSS-1000 layout.

Layout under the data root: one folder per class, ``<class>/<n>.jpg`` (RGB) with its mask ``<class>/<n>.png``
(``n`` = 1..10 in FSS-1000), 224x224. A mask pixel is foreground when any of its channels is > 0 (FSS-1000's
PNGs are 0/255 but not all of them are single-channel). Images load as uint8 ``[N, 3, S, S]`` and masks as
uint8 ``[N, S, S]`` with values 0/1; ``S`` = ``image_size``, images resampled bilinear (antialiased by PIL when
shrinking), masks nearest, and nothing is resampled when the files already have that size.

Splits:
- ``fss-1000``: the 520 / 240 / 240 class split used by recent work (``splits/fss_1000.json``, source named
  there); classes in sorted order.
- ``fss-mini``: the class split in the data folder's ``splits.json`` (``{"train": [...], "val": [...],
  "test": [...]}``), or another such file (``split_file=``), or a mapping passed as ``splits=``.

Image ids are ``<class>/<n>``; the split is named ``<dataset>/<split>/<S>px`` (plus ``@<hash>`` when fss-mini
uses a non-default class split), which enters the episode digest. Decoded splits are cached with
:func:`metabench.datasets.cache.load_or_prepare`, keyed by a manifest of the files' names, sizes and mtimes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from metabench.datasets.base import DatasetError, ImageSplit, resolve_cache_dir, resolve_data_root
from metabench.datasets.cache import Prepared, files_manifest, load_or_prepare

SPLITS = ("train", "val", "test")
READER_VERSION = 1  # bump when decoding or resampling changes, so prepared caches are rebuilt
DEFAULT_IMAGE_SIZE = {"fss-1000": 224, "fss-mini": 128}
FSS_1000_COUNTS = {"train": 520, "val": 240, "test": 240}
PAIRS_PER_CLASS = 10
NATIVE_SIZE = 224


# ------------------------------------------------------------------------------------- shared helpers


def check_image_size(dataset: str, image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise DatasetError(f"{dataset}: image_size must be an integer >= 8, got {image_size!r}")
    return int(image_size)


def resize_pair(image: Image.Image, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (any mode) as RGB uint8 ``[3, size, size]`` (bilinear) and ``mask`` ``[H, W]`` uint8 resized
    nearest to ``[size, size]``; an image whose size differs from its mask's is an error for the caller."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)  # PIL widens the filter when shrinking
    if mask.shape != (size, size):
        mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
    return np.asarray(image).transpose(2, 0, 1), np.ascontiguousarray(mask)


def decode_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------- splits


def fss_1000_classes(split: str) -> tuple[str, ...]:
    """The class names of one FSS-1000 split (sorted), from ``splits/fss_1000.json``."""
    _check_split("fss-1000", split)
    spec = json.loads(resources.files(__package__).joinpath("splits", "fss_1000.json").read_text())
    return tuple(spec["splits"][split])


def _check_split(dataset: str, split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"{dataset}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def read_split_file(path: Path) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` from a ``splits.json``, checked for disjointness."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read the class split ({exc})") from exc
    return check_splits(data, str(path))


def check_splits(data: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(data, Mapping) or any(s not in data for s in SPLITS):
        raise DatasetError(f"{where}: a class split must be a mapping with keys {list(SPLITS)}")
    out: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split in SPLITS:
        names = data[split]
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{where}: {split!r} must be a list of class folder names")
        for name in names:
            if name in owner:
                raise DatasetError(f"{where}: class {name!r} is in both {owner[name]!r} and {split!r}")
            owner[name] = split
        out[split] = list(names)
    return out


# ------------------------------------------------------------------------------------------- decoding


def class_pairs(class_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths of one class folder, ordered by the number in the file name.

    Raises:
        DatasetError: the folder is missing, holds no pairs, or an image has no mask.
    """
    if not class_dir.is_dir():
        raise DatasetError(f"{class_dir}: class folder is missing")
    stems = sorted((p.stem for p in class_dir.glob("*.jpg") if p.stem.isdigit()), key=int)
    if not stems:
        raise DatasetError(f"{class_dir}: holds no <n>.jpg images")
    pairs = []
    for stem in stems:
        mask = class_dir / f"{stem}.png"
        if not mask.is_file():
            raise DatasetError(f"{class_dir / (stem + '.jpg')}: has no mask {mask.name}")
        pairs.append((class_dir / f"{stem}.jpg", mask))
    return pairs


def read_pair(image_path: Path, mask_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode one FSS pair: RGB ``[3, size, size]`` and a 0/1 mask ``[size, size]`` (any channel > 0)."""
    try:
        with Image.open(mask_path) as mask_image:
            raw = np.asarray(mask_image)
        with Image.open(image_path) as image:
            image.load()
            if image.size != (raw.shape[1], raw.shape[0]):
                raise DatasetError(f"{image_path}: image is {image.size[0]}x{image.size[1]} but its mask "
                                   f"{mask_path.name} is {raw.shape[1]}x{raw.shape[0]}")
            mask = (raw.reshape(raw.shape[0], raw.shape[1], -1) > 0).any(axis=2).astype(np.uint8)
            return resize_pair(image, mask, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{image_path}: cannot decode the image or its mask ({type(exc).__name__}: {exc})") \
            from exc


def _build(root: Path, classes: Sequence[str], pairs: list[list[tuple[Path, Path]]], size: int) -> Prepared:
    flat = [pair for group in pairs for pair in group]
    images = np.empty((len(flat), 3, size, size), dtype=np.uint8)
    masks = np.empty((len(flat), size, size), dtype=np.uint8)
    with ThreadPoolExecutor(decode_workers()) as pool:  # PIL releases the GIL while decoding
        for i, (image, mask) in enumerate(pool.map(lambda p: read_pair(p[0], p[1], size), flat)):
            images[i], masks[i] = image, mask
    counts = [len(group) for group in pairs]
    ids = [f"{name}/{image.stem}" for name, group in zip(classes, pairs) for image, _ in group]
    meta = {"classes": list(classes), "offsets": [0, *np.cumsum(counts).tolist()], "image_ids": ids}
    return Prepared(images, meta, masks)


def _load(dataset: str, name: str, split: str, root: Path, classes: Sequence[str], size: int,
          cache_dir: str | os.PathLike[str] | None) -> ImageSplit:
    cache = resolve_cache_dir(cache_dir)
    pairs = [class_pairs(root / c) for c in classes]
    files = [path for group in pairs for pair in group for path in pair]
    params = {"reader": READER_VERSION, "split": split, "size": size, "resample": "bilinear/nearest",
              "classes": hashlib.sha256("\n".join(classes).encode()).hexdigest()}
    prepared = load_or_prepare(f"{dataset}-{split}", [files_manifest(dataset, root, files, cache)], params,
                               lambda: _build(root, classes, pairs, size), cache)
    meta = prepared.meta
    assert prepared.masks is not None
    return ImageSplit(name, torch.from_numpy(prepared.images), np.asarray(meta["offsets"], dtype=np.int64),
                      tuple(meta["classes"]), tuple(meta["image_ids"]), torch.from_numpy(prepared.masks))


# --------------------------------------------------------------------------------------------- public API


def load_fss_1000(split: str, root: str | os.PathLike[str] | None = None,
                  cache_dir: str | os.PathLike[str] | None = None, image_size: int = 224) -> ImageSplit:
    """One FSS-1000 split (520 / 240 / 240 classes x 10 pairs) named ``"fss-1000/<split>/<S>px"``.

    ``root``: the folder holding the 1,000 class folders (or a folder holding ``fss-1000/``), else
    ``$METABENCH_DATA/fss-1000``.

    Raises:
        DatasetError: unknown split, bad size, missing root or class folder, an image without a mask.
    """
    _check_split("fss-1000", split)
    size = check_image_size("fss-1000", image_size)
    data_root = resolve_data_root(root, "fss-1000")
    return _load("fss-1000", f"fss-1000/{split}/{size}px", split, data_root, fss_1000_classes(split), size, cache_dir)


def fss_mini_splits(root: Path, split_file: str | os.PathLike[str] | None = None,
                    splits: Mapping[str, Sequence[str]] | None = None) -> tuple[dict[str, list[str]], str]:
    """fss-mini's class split and a name tag: ``""`` for the data folder's own ``splits.json``, else
    ``"@<hash>"`` of the class lists (so a different split gets a different name and digest)."""
    if splits is not None and split_file is not None:
        raise DatasetError("fss-mini: pass split_file or splits, not both")
    if splits is not None:
        defined = check_splits(splits, "fss-mini splits option")
    else:
        defined = read_split_file(Path(split_file) if split_file is not None else root / "splits.json")
    default = root / "splits.json"
    if splits is None and (split_file is None or Path(split_file).resolve() == default.resolve()):
        return defined, ""
    text = json.dumps({s: defined[s] for s in SPLITS}, sort_keys=True)
    return defined, "@" + hashlib.sha256(text.encode()).hexdigest()[:8]


def load_fss_mini(split: str, root: str | os.PathLike[str] | None = None,
                  cache_dir: str | os.PathLike[str] | None = None, image_size: int = 128,
                  split_file: str | os.PathLike[str] | None = None,
                  splits: Mapping[str, Sequence[str]] | None = None) -> ImageSplit:
    """One split of fss-mini (real image/mask pairs in the FSS-1000 layout), named ``"fss-mini/<split>/<S>px"``.

    The default size is 128 (the files are 224x224): small enough for CPU runs; pass ``image_size=224`` for the
    native resolution. Classes come from ``<root>/splits.json`` unless ``split_file`` or ``splits`` is given;
    they are kept in the order the split lists them.
    """
    _check_split("fss-mini", split)
    size = check_image_size("fss-mini", image_size)
    data_root = resolve_data_root(root, "fss-mini")
    defined, tag = fss_mini_splits(data_root, split_file, splits)
    classes = defined[split]
    if not classes:
        raise DatasetError(f"fss-mini: split {split!r} lists no classes")
    return _load("fss-mini", f"fss-mini{tag}/{split}/{size}px", split, data_root, classes, size, cache_dir)


# ------------------------------------------------------------------------------------------------- verify


def _verify(dataset: str, root: Path, splits: Mapping[str, Sequence[str]], expected: Mapping[str, int] | None,
            problems: list[str]) -> dict[str, Any]:
    """Counts, sizes and mask values of every listed class (headers and masks only, not full image decodes)."""
    report: dict[str, Any] = {}
    listed = {name for names in splits.values() for name in names}
    for split in SPLITS:
        names = splits[split]
        sizes: dict[str, int] = {}
        pairs_total, odd_counts, mask_values = 0, 0, set()
        for name in names:
            try:
                pairs = class_pairs(root / name)
            except DatasetError as exc:
                problems.append(str(exc))
                continue
            pairs_total += len(pairs)
            if len(pairs) != PAIRS_PER_CLASS:
                odd_counts += 1
                problems.append(f"{root / name}: {len(pairs)} pairs, expected {PAIRS_PER_CLASS}")
            for image_path, mask_path in pairs:
                try:
                    with Image.open(image_path) as image:
                        key = f"{image.size[0]}x{image.size[1]}"
                    with Image.open(mask_path) as mask:
                        values = np.unique(np.asarray(mask))
                        if mask.size != image.size:
                            problems.append(f"{mask_path}: mask is {mask.size}, its image {image.size}")
                except (OSError, SyntaxError, ValueError) as exc:
                    problems.append(f"{image_path}: unreadable ({exc})")
                    continue
                sizes[key] = sizes.get(key, 0) + 1
                mask_values.update(int(v) for v in values)
                if values.max() == 0:
                    problems.append(f"{mask_path}: mask has no foreground")
        report[split] = {"classes": len(names), "pairs": pairs_total, "image_sizes": sizes,
                         "mask_values": sorted(mask_values)}
        if expected is not None and len(names) != expected[split]:
            problems.append(f"{split}: {len(names)} classes, expected {expected[split]}")
        other = {k: v for k, v in sizes.items() if k != f"{NATIVE_SIZE}x{NATIVE_SIZE}"}
        if other:
            problems.append(f"{split}: {sum(other.values())} images are not {NATIVE_SIZE}x{NATIVE_SIZE} ({other})")
    unlisted = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in listed)
    if unlisted:
        problems.append(f"{root}: {len(unlisted)} class folders are in no split, e.g. {unlisted[0]!r}")
    return report


def verify_fss_1000(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check an FSS-1000 folder: every class of the 520 / 240 / 240 split present with 10 224x224 pairs and
    non-empty masks. Returns ``{"root", "splits": {split: {...}}, "problems": [...]}``."""
    data_root = resolve_data_root(root, "fss-1000")
    problems: list[str] = []
    splits = {s: fss_1000_classes(s) for s in SPLITS}
    return {"root": str(data_root), "splits": _verify("fss-1000", data_root, splits, FSS_1000_COUNTS, problems),
            "problems": problems}


def verify_fss_mini(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check an fss-mini folder against its ``splits.json`` (same checks as :func:`verify_fss_1000`)."""
    data_root = resolve_data_root(root, "fss-mini")
    problems: list[str] = []
    splits = read_split_file(data_root / "splits.json")
    return {"root": str(data_root), "splits": _verify("fss-mini", data_root, splits, None, problems),
            "problems": problems}
