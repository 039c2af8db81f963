"""Prepared caches: a dataset decoded once into a uint8 ``.npy`` file (memory-mapped on load) plus JSON metadata.

The cache key is a hash of the source files' contents and of the preprocessing parameters, so a changed file
or a changed resampling never serves stale images. Hashing a large archive on every load would cost time,
so file digests are memoized by (path, size, mtime) in the cache folder; folders of loose files are keyed
by a listing of (path, size, mtime) rather than by reading every file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metabench.core.atomic import atomic_write, atomic_write_bytes
from metabench.datasets.base import DatasetError

CACHE_FORMAT = 1  # bump when the on-disk layout of prepared caches changes


@dataclass(frozen=True)
class Prepared:
    """A decoded dataset: ``images`` uint8 ``[N, C, H, W]``, JSON-serialisable ``meta`` and, for segmentation,
    ``masks`` uint8 ``[N, H, W]`` (stored beside the images as ``<stem>.masks.npy``)."""

    images: np.ndarray
    meta: dict[str, Any]
    masks: np.ndarray | None = None


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes, memoized by (absolute path, size, mtime_ns) under ``memo_dir`` if given."""
    stat = path.stat()
    memo: Path | None = None
    if memo_dir is not None:
        ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        memo = memo_dir / "digests" / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".txt")
        if memo.is_file():
            return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if memo is not None:
        atomic_write_bytes(memo, value.encode(), durable=False)
    return value


def sources_fingerprint(sources: Iterable[Path], memo_dir: Path | None = None) -> str:
    """One sha256 over ``sources``: each file's contents; for a folder, a listing of every file's relative
    path, size and mtime (hashing tens of thousands of loose images on every load would take seconds)."""
    digest = hashlib.sha256()
    for source in sources:
        if source.is_dir():
            for file in sorted(p for p in source.rglob("*") if p.is_file()):
                stat = file.stat()
                digest.update(f"{file.relative_to(source).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        else:
            digest.update(f"{source.name}\0{file_sha256(source, memo_dir)}\n".encode())
    return digest.hexdigest()


def cache_key(name: str, sources: Iterable[Path], params: Mapping[str, Any], memo_dir: Path | None) -> str:
    """The key naming a prepared cache: dataset name, cache format, preprocessing params and source contents."""
    payload = json.dumps({"name": name, "format": CACHE_FORMAT, "params": params,
                          "sources": sources_fingerprint(sources, memo_dir)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def load_or_prepare(name: str, sources: Iterable[Path], params: Mapping[str, Any],
                    build: Callable[[], Prepared], cache_dir: Path) -> Prepared:
    """Return the prepared cache for (``name``, ``sources``, ``params``), building it with ``build`` if absent.

    The images come back memory-mapped copy-on-write (``mmap_mode="c"``): loading is near-instant, pages
    are read on first touch, and torch can wrap the array without a read-only warning.
    """
    key = cache_key(name, list(sources), params, cache_dir)
    stem = cache_dir / "prepared" / f"{name}-{key}"
    images_path, meta_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    masks_path = stem.with_suffix(".masks.npy")
    if not (images_path.is_file() and meta_path.is_file()):
        prepared = build()
        if prepared.images.dtype != np.uint8 or prepared.images.ndim != 4:
            raise ValueError(f"{name}: prepared images must be uint8 [N, C, H, W]")
        if prepared.masks is not None and (prepared.masks.dtype != np.uint8 or prepared.masks.ndim != 3):
            raise ValueError(f"{name}: prepared masks must be uint8 [N, H, W]")
        _save_array(images_path, prepared.images)
        if prepared.masks is not None:
            _save_array(masks_path, prepared.masks)
        # Metadata is written last: its presence marks a complete cache entry.
        atomic_write_bytes(meta_path, json.dumps({"key": key, "params": dict(params), "has_masks":
                                                  prepared.masks is not None, **prepared.meta}).encode())
    meta = json.loads(meta_path.read_text())
    masks = np.load(masks_path, mmap_mode="c") if meta.pop("has_masks", False) else None
    return Prepared(np.load(images_path, mmap_mode="c"), meta, masks)


def _save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename, so a crash never leaves a torn array."""
    atomic_write(path, lambda handle: np.save(handle, np.ascontiguousarray(array)), durable=False)


def files_manifest(dataset: str, root: Path, files: Sequence[Path], cache: Path) -> Path:
    """A file in the cache folder listing (path under ``root``, size, mtime_ns) of ``files``: the cache key's
    stand-in for thousands of loose image files. Hashing tens of thousands of files (or reading their digest
    memos) on every load would take many seconds, stat-ing them a fraction of one; (size, mtime) is trusted
    exactly as :func:`file_sha256`'s memo trusts it."""
    lines = []
    for path in files:
        try:
            stat = path.stat()
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read file ({exc})") from exc
        lines.append(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}")
    text = ("\n".join(lines) + "\n").encode()
    out = cache / "manifests" / f"{dataset}-{hashlib.sha256(text).hexdigest()[:24]}.tsv"
    if not out.is_file():  # named by its content: an existing file is already right
        atomic_write_bytes(out, text)
    return out
