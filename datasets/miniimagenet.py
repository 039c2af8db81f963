"""mini-ImageNet (Ravi & Larochelle 2017 split: 64 / 16 / 20 classes x 600 images, 84x84 RGB) from three layouts.

Accepted layouts under the data root (detected automatically, tried in this order):

``ravi``
    ``images.zip`` (entries ``images/<file>``) or an ``images/`` folder, plus ``train.csv``, ``val.csv``,
    ``test.csv`` with rows ``filename,label``. The zip is read in place with :mod:`zipfile` (no extraction);
    when both are present the zip is used.
``folders``
    ``<root>/{train,val,test}/<wnid>/<image>``, any extension PIL reads.
``learn2learn``
    ``mini-imagenet-cache-{train,validation,test}.pkl``, each a dict ``{"image_data": uint8 [N, 84, 84, 3],
    "class_dict": {wnid: [row, ...]}}``; read with :func:`metabench.datasets.safe_pickle.safe_load`.

Every layout decodes to uint8 ``[N, 3, 84, 84]`` grouped by class, classes sorted by wnid. Within a class the
canonical order is the sorted file name (``ravi``, ``folders``) or the ``class_dict`` row order
(``learn2learn``); image ``k`` of class ``wnid`` gets id ``f"{wnid}/{k:04d}"``, so the same images in any layout
give identical tensors and ids. Images are converted to RGB; an image that is not 84x84 is resized to 84x84
with PIL's BICUBIC filter (the standard files are already 84x84, so nothing is resampled for them).

Decoded splits are cached with :func:`metabench.datasets.cache.load_or_prepare`, one cache per split, keyed by
the csv and zip (or pickle) contents, or, for loose image files, by a manifest of their names, sizes and mtimes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from metabench.datasets.base import DatasetError, ImageSplit, resolve_cache_dir, resolve_data_root
from metabench.datasets.cache import Prepared, file_sha256, files_manifest, load_or_prepare
from metabench.datasets.safe_pickle import safe_load

DATASET = "mini-imagenet"
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 84
IMAGES_PER_CLASS = 600
EXPECTED_CLASSES = {"train": 64, "val": 16, "test": 20}
LAYOUTS = ("ravi", "folders", "learn2learn")
L2L_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}  # learn2learn says "validation"
READER_VERSION = 1  # bump when decoding changes, so prepared caches are rebuilt

# sha256 of the split's sorted wnids joined by "\n", from Ravi & Larochelle's csv files: verify checks the split.
RAVI_CLASS_DIGESTS = {
    "train": "0f107a65ea80bf1e1d1e5e18d368f0d007e3e4c1885f33cc071363997e3814e9",
    "val": "489f8af43b2560094c8766f36213842de429622b67b5e9fed1277ebb99806f7d",
    "test": "0db5287e659efd3391c100c88f40df0f66510dfa9be94b8d0ecc66498f4e9810",
}

_LAYOUT_HELP = ("accepted layouts: (a) 'ravi': images.zip or images/ plus train.csv, val.csv, test.csv; "
                "(b) 'folders': {train,val,test}/<wnid>/<image files>; "
                "(c) 'learn2learn': mini-imagenet-cache-{train,validation,test}.pkl")
_DECODE_CHUNK = 512  # images read per batch handed to the decoding threads


# ----------------------------------------------------------------------------------------------- layouts


def _image_extensions() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _l2l_path(root: Path, split: str) -> Path:
    return root / f"mini-imagenet-cache-{L2L_SPLIT_NAMES[split]}.pkl"


def _ravi_images(root: Path) -> Path | None:
    """The ``ravi`` layout's image store: ``images.zip`` if present, else the ``images/`` folder, else None."""
    if (root / "images.zip").is_file():
        return root / "images.zip"
    return root / "images" if (root / "images").is_dir() else None


def layouts_found(root: Path) -> list[str]:
    """Every layout that ``root`` matches (at least one split's files present), in detection order."""
    found = []
    if _ravi_images(root) is not None and any((root / f"{s}.csv").is_file() for s in SPLITS):
        found.append("ravi")
    if any((root / s).is_dir() and _class_dirs(root / s) for s in SPLITS):
        found.append("folders")
    if any(_l2l_path(root, s).is_file() for s in SPLITS):
        found.append("learn2learn")
    return found


def detect_layout(root: Path) -> str:
    """The layout of ``root``: the first of ``LAYOUTS`` it matches.

    Raises:
        DatasetError: no layout matches; the message lists the accepted layouts and what the folder holds.
    """
    found = layouts_found(root)
    if found:
        return found[0]
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(entries[:20]) + (f", ... ({len(entries)} entries)" if len(entries) > 20 else "")
    hint = ""
    if any((root / f"{s}.csv").is_file() for s in SPLITS):
        hint = " (split csv files are present but neither images.zip nor images/ is)"
    raise DatasetError(f"{DATASET}: {root} matches no known layout{hint}; it holds: {shown or 'nothing'}. "
                       f"{_LAYOUT_HELP}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"{DATASET}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


# -------------------------------------------------------------------------------------------- file plans


@dataclass(frozen=True)
class _FilePlan:
    """What a file-based split reads: classes (sorted), each class's images in canonical order, and sources.

    ``members[k]`` are zip entry names (``zip_path`` set) or image file paths; ``sources`` are the files
    fingerprinted for the cache key besides the image files themselves (the csv, the zip).
    """

    classes: tuple[str, ...]
    members: tuple[tuple[str, ...], ...]
    sources: tuple[Path, ...]
    zip_path: Path | None = None

    @property
    def image_files(self) -> list[str]:
        return [] if self.zip_path is not None else [p for group in self.members for p in group]


def _read_split_csv(path: Path) -> dict[str, list[str]]:
    """``{label: [filename, ...]}`` from a Ravi-style ``filename,label`` csv."""
    if not path.is_file():
        raise DatasetError(f"{DATASET}: layout 'ravi' needs {path}, which is missing")
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    with open(path, newline="") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if header is None or [h.strip() for h in header] != ["filename", "label"]:
            raise DatasetError(f"{path}: expected the header 'filename,label', found {header!r}")
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DatasetError(f"{path}, line {line}: expected 'filename,label', found {row!r}")
            filename, label = row[0].strip(), row[1].strip()
            if filename in seen:
                raise DatasetError(f"{path}, line {line}: {filename!r} is listed twice")
            seen.add(filename)
            groups.setdefault(label, []).append(filename)
    if not groups:
        raise DatasetError(f"{path}: lists no images")
    return groups


def _plan_ravi(root: Path, split: str) -> _FilePlan:
    csv_path = root / f"{split}.csv"
    groups = _read_split_csv(csv_path)
    classes = tuple(sorted(groups))
    names = tuple(tuple(sorted(groups[c])) for c in classes)
    store = _ravi_images(root)
    if store is None:
        raise DatasetError(f"{DATASET}: layout 'ravi' needs images.zip or images/ in {root}")
    if store.suffix == ".zip":
        # Entry names are checked when the zip is opened for decoding: a valid cache proves they exist.
        return _FilePlan(classes, names, (csv_path, store), zip_path=store)
    paths = tuple(tuple(str(store / n) for n in group) for group in names)
    missing = [p for group in paths for p in group if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{csv_path} names {len(missing)} image(s) missing from {store}, e.g. {missing[0]}")
    return _FilePlan(classes, paths, (csv_path,))


def _plan_folders(root: Path, split: str) -> _FilePlan:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(f"{DATASET}: layout 'folders' needs {split_dir}/<wnid>/<images>, which is missing")
    extensions = _image_extensions()
    classes, members = [], []
    for class_dir in _class_dirs(split_dir):
        files = sorted(p.name for p in class_dir.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)
        if not files:
            raise DatasetError(f"{class_dir}: class folder holds no images")
        classes.append(class_dir.name)
        members.append(tuple(str(class_dir / f) for f in files))
    if not classes:
        raise DatasetError(f"{split_dir}: holds no class folders")
    return _FilePlan(tuple(classes), tuple(members), ())


def _zip_entries(zip_file: zipfile.ZipFile, plan: _FilePlan, csv_path: Path) -> list[list[zipfile.ZipInfo]]:
    """The zip entry of every planned file name (``images/<name>``, or ``<name>`` anywhere in the zip)."""
    by_name = {info.filename: info for info in zip_file.infolist() if not info.is_dir()}
    by_base = {name.rsplit("/", 1)[-1]: info for name, info in by_name.items()}
    entries, missing = [], []
    for group in plan.members:
        row = []
        for name in group:
            info = by_name.get(f"images/{name}") or by_base.get(name)
            if info is None:
                missing.append(name)
            else:
                row.append(info)
        entries.append(row)
    if missing:
        raise DatasetError(f"{csv_path} names {len(missing)} image(s) missing from {plan.zip_path} "
                           f"(looked for images/<name>), e.g. {missing[0]!r}")
    return entries


# ------------------------------------------------------------------------------------------------ decoding


def _to_chw(image: Image.Image) -> np.ndarray:
    """RGB uint8 ``[3, 84, 84]``; resamples with BICUBIC only when the image is not already 84x84."""
    if image.mode == "RGB":
        image.load()  # decode in place; convert() would decode and then copy
    else:
        image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(image).transpose(2, 0, 1)


def _decode(source: bytes | str, label: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return _to_chw(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{label}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def _decode_all(items: Iterator[tuple[Callable[[], bytes | str], str]], total: int, desc: str) -> np.ndarray:
    """Decode ``total`` images into one uint8 ``[total, 3, 84, 84]`` array, with a progress bar.

    ``items`` yields (reader, label); readers run on this thread (zip reads share one file handle), decoding
    runs on a small thread pool (PIL releases the GIL while decoding).
    """
    out = np.empty((total, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    workers = max(1, min(4, os.cpu_count() or 1))
    index = 0
    with ThreadPoolExecutor(workers) as pool, tqdm(total=total, desc=desc, unit="img") as bar:
        while True:
            chunk = [(read(), label) for read, label in itertools.islice(items, _DECODE_CHUNK)]
            if not chunk:
                break
            for array in pool.map(lambda pair: _decode(*pair), chunk):
                out[index] = array
                index += 1
            bar.update(len(chunk))
    if index != total:
        raise DatasetError(f"{desc}: expected {total} images, decoded {index}")
    return out


def _zip_reader(zip_file: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return zip_file.read(info)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DatasetError(f"{label}: cannot read zip entry ({exc})") from exc
    return read


def _build_files(plan: _FilePlan, layout: str, split: str, root: Path) -> Prepared:
    total = sum(len(group) for group in plan.members)
    desc = f"{DATASET} {split}: decoding"
    if plan.zip_path is not None:
        try:
            zip_file = zipfile.ZipFile(plan.zip_path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(f"{plan.zip_path}: not a readable zip ({exc})") from exc
        with zip_file:
            entries = _zip_entries(zip_file, plan, root / f"{split}.csv")
            items = ((_zip_reader(zip_file, info, f"{plan.zip_path}: {info.filename}"),
                      f"{plan.zip_path}: {info.filename}") for group in entries for info in group)
            images = _decode_all(items, total, desc)
    else:
        items = (((lambda p=path: p), path) for group in plan.members for path in group)
        images = _decode_all(items, total, desc)
    counts = [len(group) for group in plan.members]
    return Prepared(images, _meta(layout, split, plan.classes, counts))


def _meta(layout: str, split: str, classes: Iterable[str], counts: list[int]) -> dict[str, Any]:
    classes = list(classes)
    ids = [f"{wnid}/{k:04d}" for wnid, n in zip(classes, counts) for k in range(n)]
    return {"layout": layout, "split": split, "classes": classes,
            "offsets": [0, *np.cumsum(counts).tolist()], "image_ids": ids}


def _l2l_arrays(path: Path) -> tuple[Any, dict[str, list[int]]]:
    """``(image_data, class_dict)`` from a learn2learn cache, checked for shape and row indices."""
    data = safe_load(path)
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"{path}: expected a dict with 'image_data' and 'class_dict', found {keys}")
    image_data, class_dict = data["image_data"], data["class_dict"]
    if not isinstance(class_dict, dict) or not class_dict:
        raise DatasetError(f"{path}: 'class_dict' must be a non-empty dict {{wnid: [row, ...]}}")
    n = len(image_data)
    rows: dict[str, list[int]] = {}
    for wnid, indices in class_dict.items():
        indices = [int(i) for i in np.asarray(indices).ravel()]
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise DatasetError(f"{path}: class {wnid}: row {bad[0]} is outside image_data's {n} rows")
        if not indices:
            raise DatasetError(f"{path}: class {wnid} lists no rows")
        rows[str(wnid)] = indices
    return image_data, rows


def _l2l_row(image_data: Any, row: int, path: Path) -> np.ndarray:
    """One learn2learn row as uint8 ``[3, 84, 84]``; a row that is not an ``[H, W, 3]`` uint8 image is an error."""
    array = np.asarray(image_data[row])
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise DatasetError(f"{path}: row {row} is not a uint8 [H, W, 3] image "
                           f"(found {array.dtype} {tuple(array.shape)})")
    if array.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
        return array.transpose(2, 0, 1)
    return _to_chw(Image.fromarray(array))


def _build_l2l(path: Path, split: str) -> Prepared:
    image_data, rows = _l2l_arrays(path)
    classes = sorted(rows)
    counts = [len(rows[c]) for c in classes]
    out = np.empty((sum(counts), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    fast = (isinstance(image_data, np.ndarray) and image_data.dtype == np.uint8
            and image_data.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3))
    index = 0
    for wnid in tqdm(classes, desc=f"{DATASET} {split}: copying {path.name}", unit="class"):
        if fast:  # the usual case: one gather + transpose per class
            out[index:index + len(rows[wnid])] = image_data[rows[wnid]].transpose(0, 3, 1, 2)
            index += len(rows[wnid])
            continue
        for row in rows[wnid]:
            out[index] = _l2l_row(image_data, row, path)
            index += 1
    return Prepared(out, _meta("learn2learn", split, classes, counts))


# ---------------------------------------------------------------------------------------------- public API


def prepare_mini_imagenet(split: str, root: str | os.PathLike[str] | None = None,
                          cache_dir: str | os.PathLike[str] | None = None) -> Prepared:
    """Decode one split to uint8 ``[N, 3, 84, 84]`` (cached; see the module docstring for layouts and order).

    ``meta`` holds ``layout``, ``split``, ``classes`` (wnids, sorted), ``offsets`` (``[K + 1]``) and
    ``image_ids`` (``"<wnid>/<kkkk>"``).

    Raises:
        DatasetError: unknown split, missing root, no matching layout, a missing or undecodable image
            (the message names the file, or the pickle and row).
    """
    _check_split(split)
    data_root = resolve_data_root(root, DATASET)
    cache = resolve_cache_dir(cache_dir)
    layout = detect_layout(data_root)
    params = {"reader": READER_VERSION, "layout": layout, "split": split, "size": IMAGE_SIZE,
              "resample": "bicubic-if-not-84", "mode": "RGB"}
    build: Callable[[], Prepared]
    if layout == "learn2learn":
        path = _l2l_path(data_root, split)
        if not path.is_file():
            raise DatasetError(f"{DATASET}: layout 'learn2learn' needs {path}, which is missing")
        sources: tuple[Path, ...] = (path,)
        build = lambda: _build_l2l(path, split)  # noqa: E731
    else:
        plan = _plan_ravi(data_root, split) if layout == "ravi" else _plan_folders(data_root, split)
        manifest = ([files_manifest(DATASET, data_root, [Path(f) for f in plan.image_files], cache)]
                    if plan.image_files else [])
        sources = (*plan.sources, *manifest)
        build = lambda: _build_files(plan, layout, split, data_root)  # noqa: E731
    return load_or_prepare(f"{DATASET}-{split}", sources, params, build, cache)


def load_mini_imagenet(split: str, root: str | os.PathLike[str] | None = None,
                       cache_dir: str | os.PathLike[str] | None = None) -> ImageSplit:
    """One split of mini-ImageNet as an :class:`ImageSplit` named ``"mini-imagenet/ravi/<split>"``.

    The first call decodes and caches (about a minute for all 60,000 images); later calls memory-map the cache.
    """
    prepared = prepare_mini_imagenet(split, root, cache_dir)
    meta = prepared.meta
    return ImageSplit(name=f"{DATASET}/ravi/{split}", images=torch.from_numpy(prepared.images),
                      offsets=np.asarray(meta["offsets"], dtype=np.int64), class_names=tuple(meta["classes"]),
                      image_ids=tuple(meta["image_ids"]))


# ------------------------------------------------------------------------------------------------- verify


def _size_counts(readers: Iterable[tuple[Callable[[], bytes | str], str]], total: int, desc: str,
                 problems: list[str]) -> dict[str, int]:
    """``{"WxH": count}`` from image headers (no full decode); unreadable files are added to ``problems``."""
    sizes: dict[str, int] = {}
    for read, label in tqdm(readers, total=total, desc=desc, unit="img"):
        try:
            source = read()
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                key = f"{image.size[0]}x{image.size[1]}"
        except (DatasetError, OSError, SyntaxError, ValueError) as exc:
            problems.append(f"{label}: unreadable image ({exc})")
            continue
        sizes[key] = sizes.get(key, 0) + 1
    return sizes


@dataclass(frozen=True)
class _SplitFacts:
    """What verify learns about one split: images per class, image sizes, and image file names (if files)."""

    counts: dict[str, int]
    sizes: dict[str, int]
    files: frozenset[str] = frozenset()


def _verify_files(root: Path, layout: str, split: str, problems: list[str]) -> _SplitFacts:
    plan = _plan_ravi(root, split) if layout == "ravi" else _plan_folders(root, split)
    total = sum(len(group) for group in plan.members)
    desc = f"{DATASET} {split}: checking"
    if plan.zip_path is not None:
        with zipfile.ZipFile(plan.zip_path) as zip_file:
            entries = _zip_entries(zip_file, plan, root / f"{split}.csv")
            readers = ((_zip_reader(zip_file, info, f"{plan.zip_path}: {info.filename}"),
                        f"{plan.zip_path}: {info.filename}") for group in entries for info in group)
            sizes = _size_counts(readers, total, desc, problems)
    else:
        readers = (((lambda p=p: p), p) for group in plan.members for p in group)
        sizes = _size_counts(readers, total, desc, problems)
    return _SplitFacts(counts={wnid: len(group) for wnid, group in zip(plan.classes, plan.members)},
                       sizes=sizes, files=frozenset(Path(n).name for group in plan.members for n in group))


def _verify_l2l(root: Path, split: str, problems: list[str]) -> _SplitFacts:
    path = _l2l_path(root, split)
    if not path.is_file():
        raise DatasetError(f"{DATASET}: layout 'learn2learn' needs {path}, which is missing")
    image_data, rows = _l2l_arrays(path)
    used = [r for indices in rows.values() for r in indices]
    if len(set(used)) != len(used):
        problems.append(f"{path}: {len(used) - len(set(used))} rows belong to more than one class entry")
    if len(set(used)) != len(image_data):
        problems.append(f"{path}: {len(image_data) - len(set(used))} of {len(image_data)} rows belong to no class")
    sizes: dict[str, int] = {}
    for row in used:
        shape = np.shape(image_data[row])
        key = f"{shape[1]}x{shape[0]}" if len(shape) == 3 else f"shape {shape}"
        sizes[key] = sizes.get(key, 0) + 1
    return _SplitFacts(counts={wnid: len(indices) for wnid, indices in rows.items()}, sizes=sizes)


def verify_mini_imagenet(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check a mini-ImageNet folder against the Ravi & Larochelle split without decoding every image.

    Returns:
        ``{"root", "layout", "layouts_found", "splits": {split: {"classes", "images", "images_per_class":
        {"min", "max"}, "image_sizes": {"WxH": count}, "ravi_classes": bool}}, "sha256": {file: digest},
        "problems": [str, ...]}``; ``problems`` is empty when the data matches 64 / 16 / 20 classes x 600
        84x84 images in disjoint splits with Ravi & Larochelle's classes.

    Raises:
        DatasetError: the root is missing or matches no layout (there is nothing to check).
    """
    data_root = resolve_data_root(root, DATASET)
    layout = detect_layout(data_root)
    problems: list[str] = []
    report: dict[str, Any] = {"root": str(data_root), "layout": layout, "layouts_found": layouts_found(data_root),
                              "splits": {}, "sha256": {}, "problems": problems}
    classes_of: dict[str, set[str]] = {}
    files_of: dict[str, set[str]] = {}
    for split in SPLITS:
        try:
            facts = (_verify_l2l(data_root, split, problems) if layout == "learn2learn"
                     else _verify_files(data_root, layout, split, problems))
        except DatasetError as exc:
            problems.append(str(exc))
            continue
        classes_of[split], files_of[split] = set(facts.counts), set(facts.files)
        report["splits"][split] = _split_report(split, facts.counts, facts.sizes, problems)
    _check_disjoint(classes_of, files_of, problems)
    report["sha256"] = {p.name: file_sha256(p) for p in _named_files(data_root, layout) if p.is_file()}
    return report


def _split_report(split: str, counts: dict[str, int], sizes: dict[str, int], problems: list[str]) -> dict[str, Any]:
    """One split's summary; appends to ``problems`` what differs from Ravi & Larochelle's split."""
    digest = hashlib.sha256("\n".join(sorted(counts)).encode()).hexdigest()
    if len(counts) != EXPECTED_CLASSES[split]:
        problems.append(f"{split}: {len(counts)} classes, expected {EXPECTED_CLASSES[split]}")
    odd = {wnid: n for wnid, n in sorted(counts.items()) if n != IMAGES_PER_CLASS}
    if odd:
        wnid, n = next(iter(odd.items()))
        problems.append(f"{split}: {len(odd)} classes do not have {IMAGES_PER_CLASS} images (e.g. {wnid}: {n})")
    other = {k: v for k, v in sizes.items() if k != f"{IMAGE_SIZE}x{IMAGE_SIZE}"}
    if other:
        problems.append(f"{split}: {sum(other.values())} images are not {IMAGE_SIZE}x{IMAGE_SIZE} ({other}); "
                        f"loading resizes them with BICUBIC")
    if digest != RAVI_CLASS_DIGESTS[split]:
        problems.append(f"{split}: the classes differ from Ravi & Larochelle's {split} split")
    return {"classes": len(counts), "images": sum(counts.values()),
            "images_per_class": {"min": min(counts.values()), "max": max(counts.values())},
            "image_sizes": sizes, "ravi_classes": digest == RAVI_CLASS_DIGESTS[split]}


def _check_disjoint(classes_of: dict[str, set[str]], files_of: dict[str, set[str]], problems: list[str]) -> None:
    """Appends a problem for every pair of splits sharing classes or image files."""
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            shared = classes_of.get(a, set()) & classes_of.get(b, set())
            if shared:
                problems.append(f"{a} and {b} share {len(shared)} classes, e.g. {sorted(shared)[0]}")
            files = files_of.get(a, set()) & files_of.get(b, set())
            if files:
                problems.append(f"{a} and {b} share {len(files)} image files, e.g. {sorted(files)[0]}")


def _named_files(data_root: Path, layout: str) -> list[Path]:
    """The files whose sha256 the report lists (per-image digests of a folder layout would be noise; the
    prepared cache fingerprints those anyway)."""
    if layout == "ravi":
        return [data_root / f"{s}.csv" for s in SPLITS] + [data_root / "images.zip"]
    if layout == "learn2learn":
        return [_l2l_path(data_root, s) for s in SPLITS]
    return []
