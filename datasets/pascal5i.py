"""PASCAL-5i (Shaban et al., BMVC 2017): few-shot segmentation on PASCAL VOC 2012 + SBD, 4 folds of 5 classes.

Data layout (the VOC root, given as ``root``, as ``<root>/pascal-5i`` or as ``$METABENCH_DATA/pascal-5i``; a
``VOCdevkit/VOC2012`` or ``VOC2012`` folder inside it is used when present)::

    JPEGImages/<id>.jpg              VOC 2012 images
    SegmentationClassAug/<id>.png    SBD-augmented label maps: 0 = background, 1..20 = class, 255 = boundary

Per-fold image lists, as used by recent work (HSNet), are read from a folder (``lists=``; by default the
first of ``<root>/splits/pascal-5i``, ``<data root>/splits/pascal-5i``, ``$METABENCH_DATA/splits/pascal-5i``)
holding ``trn/fold{0..3}.txt`` and ``val/fold{0..3}.txt`` with lines ``<image id>__<class>``; ``trn/fold{j}``
lists VOC-train (SBD) images of fold ``j``'s classes and ``val/fold{j}`` VOC-val images of them.

Splits of fold ``i`` (classes ``5i+1 .. 5i+5`` are the novel ones, ``splits/pascal_5i.json``):
- ``train``: the other 15 classes, rows of ``trn/fold{j}`` for every ``j != i`` (as HSNet trains);
- ``test``: the fold's 5 classes, rows of ``val/fold{i}``;
- ``val``: by default (``val="base"``) the 15 training classes on their VOC-val images (``val/fold{j}``,
  ``j != i``): held out from training and from the test classes, so model selection never sees the test
  set. ``val="novel"`` makes it the test rows, as the literature does (named ``val-novel``).

A row is an (image, class) pair: the same VOC image may appear under two classes with different masks.
Masks are 1 where the label map equals the row's class, 255 on the boundary label, 0 elsewhere (other
classes are background). Images are resized to ``image_size`` squared (bilinear; masks nearest), as HSNet
does. Image ids are ``<image id>__<class>`` (e.g. ``2007_000033__1``); the split is named
``pascal-5i/fold<i>/<split>/<S>px``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from metabench.datasets.base import (
    DATA_ENV,
    MASK_IGNORE,
    DatasetError,
    ImageSplit,
    resolve_cache_dir,
    resolve_data_root,
)
from metabench.datasets.cache import Prepared, files_manifest, load_or_prepare
from metabench.datasets.fss import check_image_size, decode_workers, resize_pair

DATASET = "pascal-5i"
SPLITS = ("train", "val", "test")
FOLDS = (0, 1, 2, 3)
VAL_MODES = ("base", "novel")
READER_VERSION = 1  # bump when decoding or resampling changes, so prepared caches are rebuilt


def fold_classes(fold: int) -> tuple[int, ...]:
    """VOC class ids (1..20) of ``fold``'s novel classes, from ``splits/pascal_5i.json``."""
    return tuple(_spec()["folds"][str(_check_fold(fold))])


def class_names() -> dict[int, str]:
    """VOC class id -> name."""
    return {int(k): v for k, v in _spec()["classes"].items()}


def _spec() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("splits", "pascal_5i.json").read_text())


def _check_fold(fold: Any) -> int:
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or int(fold) not in FOLDS:
        raise DatasetError(f"{DATASET}: fold must be one of {list(FOLDS)}, got {fold!r}")
    return int(fold)


def voc_root(root: str | os.PathLike[str] | None) -> Path:
    """The folder holding ``JPEGImages/`` and ``SegmentationClassAug/``."""
    path = resolve_data_root(root, DATASET)
    for inner in (Path("VOCdevkit") / "VOC2012", Path("VOC2012")):
        if (path / inner / "JPEGImages").is_dir():
            return path / inner
    missing = [d for d in ("JPEGImages", "SegmentationClassAug") if not (path / d).is_dir()]
    if missing:
        raise DatasetError(f"{DATASET}: {path} has no {' or '.join(missing)}/ (expected VOC 2012 JPEGImages/ and "
                           f"the SBD-augmented SegmentationClassAug/; see docs/segmentation.md)")
    return path


def lists_dir(root: str | os.PathLike[str] | None, voc: Path, lists: str | os.PathLike[str] | None) -> Path:
    """The folder of per-fold lists: ``lists`` if given, else the first of the default places that exists."""
    if lists is not None:
        candidates = [Path(lists)]
    else:
        candidates = [voc / "splits" / DATASET]
        if root is not None:
            candidates.append(Path(root) / "splits" / DATASET)
        candidates.append(voc.parent / "splits" / DATASET)
        if os.environ.get(DATA_ENV):
            candidates.append(Path(os.environ[DATA_ENV]) / "splits" / DATASET)
    for path in candidates:
        if (path / "trn").is_dir() and (path / "val").is_dir():
            return path
    raise DatasetError(f"{DATASET}: no per-fold image lists (trn/fold*.txt, val/fold*.txt) in "
                       f"{', '.join(str(p) for p in dict.fromkeys(candidates))}; pass lists=PATH "
                       f"(see docs/segmentation.md for where to get them)")


def read_fold_list(path: Path, fold: int) -> list[tuple[str, int]]:
    """(image id, class id) rows of one list file; every class must belong to ``fold``."""
    if not path.is_file():
        raise DatasetError(f"{DATASET}: list {path} is missing")
    allowed = set(fold_classes(fold))
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        image, sep, cls = line.rpartition("__")
        if not sep or not image or not cls.isdigit():
            raise DatasetError(f"{path}, line {number}: expected '<image id>__<class>', found {line!r}")
        if int(cls) not in allowed:
            raise DatasetError(f"{path}, line {number}: class {int(cls)} is not in fold {fold} "
                               f"(classes {sorted(allowed)})")
        rows.append((image, int(cls)))
    return rows


def split_rows(lists: Path, fold: int, split: str, val: str = "base") -> list[tuple[str, int]]:
    """The (image id, class id) rows of one split of ``fold`` (see the module docstring), sorted by class, then
    image id; duplicates are dropped."""
    if split not in SPLITS:
        raise DatasetError(f"{DATASET}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if val not in VAL_MODES:
        raise DatasetError(f"{DATASET}: val must be one of {list(VAL_MODES)}, got {val!r}")
    if split == "test" or (split == "val" and val == "novel"):
        sources = [("val", fold)]
    else:
        sources = [("trn" if split == "train" else "val", j) for j in FOLDS if j != fold]
    rows = {row for kind, j in sources for row in read_fold_list(lists / kind / f"fold{j}.txt", j)}
    if not rows:
        named = ", ".join(f"{k}/fold{j}.txt" for k, j in sources)
        raise DatasetError(f"{DATASET}: fold {fold} {split}: the lists {named} "
                           f"in {lists} name no images")
    return sorted(rows, key=lambda r: (r[1], r[0]))


def _read_labels(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as label:
            if label.mode not in ("P", "L"):
                raise DatasetError(f"{path}: expected a single-channel label map (mode P or L), found {label.mode}")
            return np.asarray(label)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot decode the label map ({exc})") from exc


def _decode(voc: Path, image_id: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One VOC image resized to ``[3, size, size]`` and its label map resized nearest to ``[size, size]``."""
    labels = _read_labels(voc / "SegmentationClassAug" / f"{image_id}.png")
    path = voc / "JPEGImages" / f"{image_id}.jpg"
    try:
        with Image.open(path) as image:
            image.load()
            if image.size != (labels.shape[1], labels.shape[0]):
                raise DatasetError(f"{path}: image is {image.size[0]}x{image.size[1]}, its label map "
                                   f"{labels.shape[1]}x{labels.shape[0]}")
            return resize_pair(image, labels, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def _build(voc: Path, rows: Sequence[tuple[str, int]], size: int) -> Prepared:
    unique = sorted({image for image, _ in rows})
    with ThreadPoolExecutor(decode_workers()) as pool:  # each VOC image decoded once, even if it has two rows
        decoded = dict(zip(unique, pool.map(lambda i: _decode(voc, i, size), unique)))
    images = np.empty((len(rows), 3, size, size), dtype=np.uint8)
    masks = np.empty((len(rows), size, size), dtype=np.uint8)
    for r, (image_id, cls) in enumerate(rows):
        pixels, labels = decoded[image_id]
        images[r] = pixels
        masks[r] = np.where(labels == cls, 1, np.where(labels == MASK_IGNORE, MASK_IGNORE, 0))
    classes = sorted({cls for _, cls in rows})
    counts = [sum(1 for _, c in rows if c == cls) for cls in classes]
    meta = {"class_ids": classes, "offsets": [0, *np.cumsum(counts).tolist()],
            "image_ids": [f"{image}__{cls}" for image, cls in rows]}
    return Prepared(images, meta, masks)


def load_pascal_5i(split: str, root: str | os.PathLike[str] | None = None,
                   cache_dir: str | os.PathLike[str] | None = None, fold: int = 0, image_size: int = 224,
                   lists: str | os.PathLike[str] | None = None, val: str = "base") -> ImageSplit:
    """One split of one PASCAL-5i fold, named ``"pascal-5i/fold<i>/<split>/<S>px"`` (``val-novel`` for
    ``split="val", val="novel"``). Class names are VOC's (``"aeroplane"``, ...), in class-id order.

    Raises:
        DatasetError: bad split / fold / size / val mode, missing VOC folders or lists, a list line naming a
            class outside its fold, a missing or undecodable image or label map.
    """
    fold = _check_fold(fold)
    size = check_image_size(DATASET, image_size)
    voc = voc_root(root)
    list_root = lists_dir(root, voc, lists)
    rows = split_rows(list_root, fold, split, val)
    cache = resolve_cache_dir(cache_dir)
    unique = sorted({image for image, _ in rows})
    files = [voc / "JPEGImages" / f"{i}.jpg" for i in unique] + [voc / "SegmentationClassAug" / f"{i}.png"
                                                                 for i in unique]
    list_files = sorted(list_root.glob("*/fold*.txt"))
    params = {"reader": READER_VERSION, "fold": fold, "split": split, "val": val, "size": size,
              "resample": "bilinear/nearest"}
    sources = [*list_files, files_manifest(DATASET, voc, files, cache)]
    prepared = load_or_prepare(f"{DATASET}-fold{fold}-{split}", sources,
                               params, lambda: _build(voc, rows, size), cache)
    names = class_names()
    label = "val-novel" if split == "val" and val == "novel" else split
    meta = prepared.meta
    assert prepared.masks is not None
    return ImageSplit(f"{DATASET}/fold{fold}/{label}/{size}px", torch.from_numpy(prepared.images),
                      np.asarray(meta["offsets"], dtype=np.int64), tuple(names[c] for c in meta["class_ids"]),
                      tuple(meta["image_ids"]), torch.from_numpy(prepared.masks))


def verify_pascal_5i(root: str | os.PathLike[str] | None = None,
                     lists: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check a VOC + SegmentationClassAug folder against the PASCAL-5i lists without decoding images fully:
    every listed image and label map exists with matching sizes, label values are in 0..20 or 255, and the
    listed class is present in the map. Returns ``{"root", "lists", "folds": {...}, "problems": [...]}``."""
    voc = voc_root(root)
    list_root = lists_dir(root, voc, lists)
    problems: list[str] = []
    folds: dict[str, Any] = {}
    checked: dict[str, tuple[tuple[int, int], frozenset[int]] | None] = {}
    for fold in FOLDS:
        entry: dict[str, Any] = {}
        for kind in ("trn", "val"):
            try:
                rows = read_fold_list(list_root / kind / f"fold{fold}.txt", fold)
            except DatasetError as exc:
                problems.append(str(exc))
                continue
            for image_id, cls in rows:
                if image_id not in checked:
                    checked[image_id] = _check_pair(voc, image_id, problems)
                facts = checked[image_id]
                if facts is not None and cls not in facts[1]:
                    problems.append(f"{voc / 'SegmentationClassAug' / (image_id + '.png')}: listed under class "
                                    f"{cls} in {kind}/fold{fold}.txt but has no pixel of it")
            if not rows:
                problems.append(f"{list_root / kind / f'fold{fold}.txt'}: lists no images")
            entry[kind] = {"rows": len(rows), "images": len({i for i, _ in rows}),
                           "classes": sorted({c for _, c in rows})}
        folds[str(fold)] = entry
    return {"root": str(voc), "lists": str(list_root), "folds": folds, "problems": problems}


def _check_pair(voc: Path, image_id: str, problems: list[str]) -> tuple[tuple[int, int], frozenset[int]] | None:
    image_path = voc / "JPEGImages" / f"{image_id}.jpg"
    try:
        labels = _read_labels(voc / "SegmentationClassAug" / f"{image_id}.png")
        with Image.open(image_path) as image:
            size = image.size
    except (DatasetError, OSError, SyntaxError, ValueError) as exc:
        problems.append(f"{image_id}: {exc}")
        return None
    if size != (labels.shape[1], labels.shape[0]):
        problems.append(f"{image_path}: image is {size}, its label map {labels.shape[::-1]}")
    values = frozenset(int(v) for v in np.unique(labels))
    bad = sorted(v for v in values if v > 20 and v != MASK_IGNORE)
    if bad:
        problems.append(f"{image_id}: label map holds values {bad} outside 0..20 and {MASK_IGNORE}")
    return size, values
