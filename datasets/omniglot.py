"""Omniglot (Lake et al., Science 2015): reader, prepared cache, and the Vinyals, MAML and Reptile class splits.

Accepted layouts under the data root (``root``, or ``$METABENCH_DATA/omniglot``):

1. ``images_background.zip`` + ``images_evaluation.zip``, the official release (read in place, never extracted);
2. ``images_background/`` + ``images_evaluation/``, the same extracted;
3. ``omniglot-py/`` holding either of the above (torchvision's download folder).

Where a set exists both as a zip and as a folder, the zip is read (one file to fingerprint, not 20,000).

Inside each, images sit at ``images_<set>/<Alphabet>/characterNN/NNNN_MM.png`` (105x105, 1-bit, 20 drawings
per character). All 1,623 characters are decoded once into a uint8 ``[32460, 1, S, S]`` cache; splits are
cut from it in memory, rotated classes included.

Pixels: white background = 255, strokes dark (the PNGs' own polarity, not inverted).
Rotations: ``rotDDD`` is the base image turned DDD degrees counter-clockwise, i.e.
``torch.rot90(x, DDD // 90, dims=(-2, -1))`` (computed with the identical ``np.rot90``), the direction of PIL's
``Image.rotate`` used by Prototypical Networks; applied after resizing, which is exact for multiples of 90.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .base import DatasetError, ImageSplit, resolve_cache_dir, resolve_data_root
from .cache import Prepared, file_sha256, load_or_prepare

SETS = ("background", "evaluation")
DRAWINGS = 20  # drawings per character in the release; rows of one character are consecutive
EXPECTED_ALPHABETS = {"background": 30, "evaluation": 20}
EXPECTED_CHARACTERS = {"background": 964, "evaluation": 659}
RESAMPLING = "lanczos"
ROTATIONS = (0, 90, 180, 270)
SPLITS: dict[str, tuple[str, ...]] = {
    "vinyals": ("train", "val", "test", "trainval"),
    "maml": ("train", "val", "test", "trainval"),
    "reptile": ("train", "test"),  # Reptile's code holds no characters out for validation
}
MAML_TRAIN, MAML_VAL = 1100, 100  # of the 1,200 meta-training characters, 100 are held out for validation
REPTILE_TRAIN, REPTILE_SEED = 1200, 0  # supervised_reptile: split_dataset(num_train=1200), "--seed" default 0
LAYOUTS = ("images_background.zip + images_evaluation.zip, or extracted images_background/ + "
           "images_evaluation/ folders (each holding <Alphabet>/characterNN/*.png), directly in the root or in "
           "root/omniglot-py/ (torchvision's layout)")

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class _Source:
    """One image set (background or evaluation), stored as a zip or as an extracted folder."""

    set_name: str
    path: Path

    @property
    def is_zip(self) -> bool:
        return self.path.suffix == ".zip"

    @property
    def prefix(self) -> str:
        return f"images_{self.set_name}"

    def label(self, rel: str) -> str:
        """Where image ``rel`` (``Alphabet/characterNN/file.png``) lives, for error messages."""
        return f"{self.path}:{self.prefix}/{rel}" if self.is_zip else str(self.path / rel)

    def list_images(self) -> list[str]:
        """Sorted ``Alphabet/characterNN/file.png`` paths of the set's images."""
        if self.is_zip:
            with self._zip() as archive:
                names = archive.namelist()
            head = self.prefix + "/"
            if not any(name.startswith(head) for name in names):
                raise DatasetError(f"omniglot: {self.path} has no entries under {head} (first entries: "
                                   f"{names[:3]}); expected {head}<Alphabet>/characterNN/*.png")
            rels = [name[len(head):] for name in names if name.startswith(head) and name.endswith(".png")]
        else:
            rels = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*.png") if p.is_file()]
        rels.sort()  # so that errors name the same (first) offender every time
        for rel in rels:
            if len(rel.split("/")) != 3:
                raise DatasetError(f"omniglot: {self.label(rel)} is not at {self.prefix}/<Alphabet>/<character>/"
                                   f"<file>.png; accepted layouts: {LAYOUTS}")
        if not rels:
            raise DatasetError(f"omniglot: no PNG images in {self.path} (expected {self.prefix}/<Alphabet>/"
                               f"characterNN/*.png)")
        return rels

    @contextmanager
    def reader(self) -> Iterator[Callable[[str], bytes]]:
        """A function from ``rel`` to the file's bytes, valid inside the ``with`` block."""
        if not self.is_zip:
            def read_file(rel: str) -> bytes:
                try:
                    return (self.path / rel).read_bytes()
                except OSError as exc:
                    raise DatasetError(f"omniglot: cannot read {self.label(rel)}: {exc}") from exc
            yield read_file
            return
        with self._zip() as archive:
            def read_entry(rel: str) -> bytes:
                try:
                    return archive.read(f"{self.prefix}/{rel}")
                except (zipfile.BadZipFile, OSError, KeyError, EOFError) as exc:  # CRC mismatch, truncation
                    raise DatasetError(f"omniglot: cannot read {self.label(rel)}: {exc}") from exc
            yield read_entry

    def _zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(f"omniglot: {self.path} is not a readable zip archive: {exc}") from exc


def _find_sources(root: PathLike | None) -> tuple[Path, list[_Source]]:
    """The data root and its two image sets, in one of the accepted layouts (zip preferred over folder)."""
    base = resolve_data_root(root, "omniglot")
    partial: list[str] = []
    for folder in (base, base / "omniglot-py"):
        found: list[_Source] = []
        for set_name in SETS:
            archive, extracted = folder / f"images_{set_name}.zip", folder / f"images_{set_name}"
            if archive.is_file():
                found.append(_Source(set_name, archive))
            elif extracted.is_dir():
                found.append(_Source(set_name, extracted))
        if len(found) == len(SETS):
            return base, found
        partial += [f"{folder}: found only {s.path.name}" for s in found]
    listing = sorted(p.name for p in base.iterdir())[:8]
    hint = f" ({'; '.join(partial)})" if partial else ""
    raise DatasetError(f"omniglot: no Omniglot files in {base}{hint}; it holds {listing}. Accepted layouts: "
                       f"{LAYOUTS}")


def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"omniglot: image_size must be a positive int, got {image_size!r}")
    return image_size


def _decode(data: bytes, label: str, size: int) -> np.ndarray:
    """One PNG as uint8 ``[size, size]``: grayscale "L", then LANCZOS to ``size`` x ``size``.

    LANCZOS is what the MAML authors' resize script asks for (cbfinn/maml ``resize_images.py``) and what
    learn2learn applies to torchvision's ``.convert("L")`` images. Converting to "L" first matters: Pillow
    silently resizes mode-"1" images with NEAREST whatever filter is asked, so the MAML script (which
    resizes the raw 1-bit image) actually produced binary images; here the edges are anti-aliased grey.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            small = image.convert("L").resize((size, size), Image.Resampling.LANCZOS)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"omniglot: cannot decode {label}: {exc}") from exc
    return np.asarray(small, dtype=np.uint8)


def _group(sources: Sequence[_Source]) -> dict[str, tuple[_Source, list[str]]]:
    """``Alphabet/characterNN`` -> (its source, its sorted image paths); characters unique across sets."""
    grouped: dict[str, tuple[_Source, list[str]]] = {}
    for source in sources:
        per_char: dict[str, list[str]] = defaultdict(list)
        for rel in source.list_images():
            per_char[rel.rsplit("/", 1)[0]].append(rel)
        for character, rels in per_char.items():
            if character in grouped:
                raise DatasetError(f"omniglot: character {character} is in both {grouped[character][0].path} "
                                   f"and {source.path}")
            grouped[character] = (source, rels)
    return grouped


def _decode_all(sources: Sequence[_Source], size: int) -> Prepared:
    """Decode every image of ``sources``: characters sorted, each one's drawings sorted by file name."""
    grouped = _group(sources)
    characters = sorted(grouped)
    for character in characters:
        source, rels = grouped[character]
        if len(rels) != DRAWINGS:
            raise DatasetError(f"omniglot: {source.label(character)} has {len(rels)} drawings, expected "
                               f"{DRAWINGS}")
    images = np.empty((len(characters) * DRAWINGS, 1, size, size), dtype=np.uint8)

    def decode_character(job: list[tuple[str, bytes]]) -> np.ndarray:
        return np.stack([_decode(data, label, size) for label, data in job])

    with ExitStack() as stack:
        readers = {s.set_name: stack.enter_context(s.reader()) for s in sources}

        def jobs() -> Iterator[list[tuple[str, bytes]]]:  # file reads stay on this thread, decoding in the pool
            for character in characters:
                source, rels = grouped[character]
                yield [(source.label(rel), readers[source.set_name](rel)) for rel in rels]

        # PIL releases the GIL while decoding and resampling, so threads overlap well without process start-up.
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)))
        bar = stack.enter_context(tqdm(total=len(images), desc="omniglot: decoding", unit="img", disable=None))
        try:
            for k, block in enumerate(pool.map(decode_character, jobs())):
                images[k * DRAWINGS:(k + 1) * DRAWINGS, 0] = block
                bar.update(DRAWINGS)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    alphabets = {s.set_name: sorted({c.split("/")[0] for c in characters if grouped[c][0] is s}) for s in sources}
    image_ids = [rel for character in characters for rel in grouped[character][1]]
    return Prepared(images, {"characters": characters, "image_ids": image_ids, "drawings": DRAWINGS,
                             "alphabets": alphabets})


def prepare_omniglot(root: PathLike | None, cache_dir: PathLike | None = None, image_size: int = 28) -> Prepared:
    """All 1,623 characters x 20 drawings decoded once to uint8 ``[32460, 1, S, S]`` (cached, memory-mapped).

    ``meta``: ``characters`` (sorted ``"Alphabet/characterNN"``; character ``k`` owns rows
    ``20k:20k+20``), ``image_ids`` (``"Alphabet/characterNN/NNNN_MM.png"`` per row), ``drawings`` (20) and
    ``alphabets`` (per set). Pixels: background 255, strokes dark; see :func:`_decode` for the resampling.

    Raises:
        DatasetError: no root, a layout not among the accepted ones, a character without 20 drawings, or an
            unreadable / corrupt image (the message names it).
    """
    size = _check_size(image_size)
    _, sources = _find_sources(root)
    params = {"image_size": size, "mode": "L", "resampling": RESAMPLING, "order": "sorted characters, files"}
    return load_or_prepare("omniglot", [s.path for s in sources], params, lambda: _decode_all(sources, size),
                           resolve_cache_dir(cache_dir))


def _check_split(scheme: str, split: str) -> None:
    if scheme not in SPLITS:
        raise DatasetError(f"omniglot: unknown split scheme {scheme!r}; valid schemes: {sorted(SPLITS)}")
    if scheme == "reptile" and split == "val":
        raise DatasetError("omniglot/reptile has no validation split (Reptile's code trains on all 1,200 "
                           "non-test characters): set episodes.val_episodes=0")
    if split not in SPLITS[scheme]:
        raise DatasetError(f"omniglot/{scheme}: unknown split {split!r}; valid splits: {list(SPLITS[scheme])}")


def _vinyals_spec() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("splits", "omniglot_vinyals.json").read_text()
    return json.loads(text)


def _vinyals_characters(split: str, characters: Sequence[str], spec: dict[str, Any]) -> list[str]:
    entry = spec["splits"][split]
    if "union" in entry:
        chosen = sorted(set().union(*(_vinyals_characters(part, characters, spec) for part in entry["union"])))
    else:
        by_alphabet: dict[str, list[str]] = defaultdict(list)
        for character in characters:
            by_alphabet[character.split("/")[0]].append(character)
        missing = [a for a in entry.get("alphabets", []) + list(entry.get("character_ranges", {}))
                   if a not in by_alphabet]
        if missing:
            raise DatasetError(f"omniglot/vinyals/{split}: alphabets {missing} are not in the data; the split "
                               f"needs the full release (both sets)")
        chosen = [c for alphabet in entry.get("alphabets", []) for c in by_alphabet[alphabet]]
        known = set(characters)
        for alphabet, (first, last) in entry.get("character_ranges", {}).items():
            wanted = [f"{alphabet}/character{n:02d}" for n in range(first, last + 1)]
            absent = [c for c in wanted if c not in known]
            if absent:
                raise DatasetError(f"omniglot/vinyals/{split}: characters {absent} are not in the data")
            chosen += wanted
        chosen = sorted(chosen)
    if len(chosen) != entry["characters"]:
        raise DatasetError(f"omniglot/vinyals/{split}: the data gives {len(chosen)} characters, the split has "
                           f"{entry['characters']}; the data does not match the Omniglot release")
    return chosen


def _maml_order(characters: Sequence[str]) -> list[str]:
    """A portable, seed-free permutation: characters sorted by sha256 of ``"maml-omniglot:<name>"``."""
    return sorted(characters, key=lambda name: hashlib.sha256(f"maml-omniglot:{name}".encode()).hexdigest())


def _reptile_order(characters: Sequence[str]) -> list[str]:
    """The order ``supervised_reptile`` splits: ``read_dataset`` lists the alphabets of both sets (merged into one
    folder by its fetch_data.sh) sorted, then each alphabet's characters sorted, and run_omniglot.py calls
    ``random.seed(0)`` and ``random.shuffle`` on that list before anything else draws from ``random``. Python 3's
    ``random.Random(seed).shuffle`` is the same algorithm and stream on every Python >= 3.2, so this is the
    authors' split when their code ran under Python 3."""
    order = sorted(characters, key=lambda name: tuple(name.split("/")))
    random.Random(REPTILE_SEED).shuffle(order)
    return order


def split_characters(scheme: str, split: str, characters: Sequence[str]) -> tuple[list[str], tuple[int, ...]]:
    """The sorted characters of ``scheme``/``split`` and the rotations (degrees) that make them classes.

    ``vinyals``: the Vinyals et al. split as published by Prototypical Networks (definition in
    ``splits/omniglot_vinyals.json``): 1028 / 172 / 423 / 1200 characters, 4 rotations each in every split.
    ``maml``: the protocol of Finn et al. 2017 (after Santoro et al. 2016): 1,200 meta-training characters,
    100 of them held out for validation, the other 423 for test; rotations are new classes in training only
    (train 1,100 x 4, trainval 1,200 x 4, val 100, test 423). The MAML code shuffled an ``os.listdir``
    order with Python's ``random``, which no one can reproduce; here the assignment is :func:`_maml_order`,
    so sizes and protocol match the paper, the exact characters do not.
    ``reptile``: the protocol of Nichol et al. 2018's code (supervised_reptile/omniglot.py ``split_dataset``,
    run_omniglot.py): 1,200 training characters with their 4 rotations, no validation split, the other 423 for
    test, upright only (``augment_dataset`` is applied to the training set alone); the characters are the code's own
    draw (:func:`_reptile_order`).
    """
    _check_split(scheme, split)
    if scheme == "vinyals":
        return _vinyals_characters(split, characters, _vinyals_spec()), ROTATIONS
    if len(characters) != sum(EXPECTED_CHARACTERS.values()):
        raise DatasetError(f"omniglot/{scheme}/{split}: needs all {sum(EXPECTED_CHARACTERS.values())} characters, "
                           f"the data has {len(characters)}")
    if scheme == "reptile":
        order = _reptile_order(characters)
        chosen, rotations = (order[:REPTILE_TRAIN], ROTATIONS) if split == "train" else (order[REPTILE_TRAIN:], (0,))
        return sorted(chosen), rotations
    order = _maml_order(characters)
    parts = {"train": (order[:MAML_TRAIN], ROTATIONS), "val": (order[MAML_TRAIN:MAML_TRAIN + MAML_VAL], (0,)),
             "test": (order[MAML_TRAIN + MAML_VAL:], (0,)), "trainval": (order[:MAML_TRAIN + MAML_VAL], ROTATIONS)}
    chosen, rotations = parts[split]
    return sorted(chosen), rotations


def _build_split(name: str, prepared: Prepared, characters: Sequence[str], rotations: Sequence[int]) -> ImageSplit:
    """Classes ``(character, rotation)`` sorted by name, each the character's rows turned counter-clockwise."""
    row_of = {c: k for k, c in enumerate(prepared.meta["characters"])}
    char_rows = [row_of[c] for c in characters]
    channels, height, width = prepared.images.shape[1:]
    # Fancy indexing reads only the chosen characters' pages of the memory-mapped cache.
    chosen = prepared.images.reshape(-1, DRAWINGS, channels, height, width)[np.asarray(char_rows, dtype=np.int64)]
    stacked = np.empty((len(char_rows), len(rotations), *chosen.shape[1:]), dtype=np.uint8)
    for r, deg in enumerate(rotations):
        # np.rot90 over (H, W) equals torch.rot90(dims=(-2, -1)), counter-clockwise; its strided copy into the
        # preallocated array is faster than torch's for uint8 (tests check equality with torch.rot90).
        stacked[:, r] = np.rot90(chosen, k=deg // 90, axes=(-2, -1))
    stacked = torch.from_numpy(stacked)  # [characters, rotations, drawings, C, H, W]: (character, rotation) order
    images = stacked.view(-1, channels, height, width)
    classes = [(f"{c}/rot{deg:03d}", k, f"@rot{deg:03d}") for c, k in zip(characters, char_rows, strict=True)
               for deg in rotations]
    order = sorted(range(len(classes)), key=lambda i: classes[i][0])
    if order != list(range(len(classes))):  # only if the names do not already sort that way
        classes = [classes[i] for i in order]
        images = stacked.view(-1, DRAWINGS, channels, height, width)[torch.tensor(order)].view_as(images)
    ids = prepared.meta["image_ids"]
    image_ids = tuple(i + suffix for _, k, suffix in classes for i in ids[k * DRAWINGS:(k + 1) * DRAWINGS])
    return ImageSplit(name, images, np.arange(len(classes) + 1) * DRAWINGS, tuple(c for c, _, _ in classes),
                      image_ids)


def load_omniglot(split: str, root: PathLike | None = None, cache_dir: PathLike | None = None,
                  scheme: str = "vinyals", image_size: int = 28) -> ImageSplit:
    """One Omniglot split as an :class:`ImageSplit` named ``omniglot/<scheme>/<split>``.

    Classes are ``"Alphabet/characterNN/rotDDD"`` in sorted order, 20 images each (class ``k`` = rows
    ``offsets[k]:offsets[k+1]``); image ids ``"Alphabet/characterNN/NNNN_MM.png@rotDDD"``. See
    :func:`split_characters` for the schemes and :func:`prepare_omniglot` for the accepted layouts.

    Raises:
        DatasetError: unknown scheme or split (lists the valid ones), or any error of :func:`prepare_omniglot`.
    """
    _check_split(scheme, split)  # before touching any file
    prepared = prepare_omniglot(root, cache_dir, image_size)
    characters, rotations = split_characters(scheme, split, prepared.meta["characters"])
    return _build_split(f"omniglot/{scheme}/{split}", prepared, characters, rotations)


def _inspect(job: tuple[str, bytes]) -> tuple[str, str] | str:
    """(``"WxH"``, mode) of one fully decoded image, or the problem that stopped it."""
    label, data = job
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return f"{image.width}x{image.height}", image.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"omniglot: cannot decode {label}: {exc}"


def _inspect_set(source: _Source, rels: Sequence[str], problems: list[str], sizes: Counter[str],
                 modes: Counter[str]) -> None:
    """Decode every image of ``source``, counting sizes and modes and appending what fails to ``problems``."""
    with source.reader() as read, ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        def jobs() -> Iterator[tuple[str, bytes]]:
            for rel in rels:
                try:
                    yield source.label(rel), read(rel)
                except DatasetError as exc:
                    problems.append(str(exc))

        for result in tqdm(pool.map(_inspect, jobs(), chunksize=64), total=len(rels),
                           desc=f"omniglot: verifying {source.set_name}", unit="img", disable=None):
            if isinstance(result, str):
                problems.append(result)
            else:
                sizes[result[0]] += 1
                modes[result[1]] += 1


def verify_omniglot(root: PathLike | None = None) -> dict[str, Any]:
    """Check an Omniglot copy: counts per set, image sizes and modes, zip digests, problems found.

    Every image is opened and decoded (zip entries are also CRC-checked by ``zipfile``). ``problems`` is
    empty when the copy matches the release: 30 + 20 alphabets, 964 + 659 characters, 20 drawings each,
    32,460 images of 105x105, and every Vinyals split resolvable.

    Raises:
        DatasetError: the root or a layout cannot be found at all (the message lists the accepted layouts).
    """
    base, sources = _find_sources(root)
    report: dict[str, Any] = {"dataset": "omniglot", "root": str(base), "sets": {}, "problems": []}
    problems: list[str] = report["problems"]
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    characters: list[str] = []
    for source in sources:
        try:
            rels = source.list_images()
        except DatasetError as exc:
            problems.append(str(exc))
            continue
        per_char = Counter(rel.rsplit("/", 1)[0] for rel in rels)
        alphabets = {c.split("/")[0] for c in per_char}
        entry: dict[str, Any] = {"source": str(source.path), "layout": "zip" if source.is_zip else "folder",
                                 "alphabets": len(alphabets), "characters": len(per_char), "images": len(rels)}
        if source.is_zip:
            entry["sha256"] = file_sha256(source.path)
        report["sets"][source.set_name] = entry
        characters += per_char
        for label, expected, seen in (("alphabets", EXPECTED_ALPHABETS, len(alphabets)),
                                      ("characters", EXPECTED_CHARACTERS, len(per_char))):
            if seen != expected[source.set_name]:
                problems.append(f"{source.path}: {seen} {label}, the release has {expected[source.set_name]}")
        problems += [f"{source.label(c)}: {n} drawings, expected {DRAWINGS}"
                     for c, n in sorted(per_char.items()) if n != DRAWINGS]
        _inspect_set(source, rels, problems, sizes, modes)
    report.update(alphabets=sum(e["alphabets"] for e in report["sets"].values()), characters=len(characters),
                  images=sum(e["images"] for e in report["sets"].values()), image_sizes=dict(sizes),
                  image_modes=dict(modes))
    odd_sizes = sorted(s for s in sizes if s != "105x105")
    if odd_sizes:
        problems.append(f"image sizes other than 105x105: {odd_sizes}")
    spec = _vinyals_spec()
    for split in SPLITS["vinyals"]:
        try:
            _vinyals_characters(split, sorted(characters), spec)
        except DatasetError as exc:
            problems.append(str(exc))
    return report
