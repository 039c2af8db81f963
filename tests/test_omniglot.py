"""Omniglot reader: counts, both split schemes against their definitions, rotations, layouts, bad input.

Real data comes from ``data_root``; layout and error tests build tiny zips / folders of a few real characters.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metabench.datasets.base import DatasetError
from metabench.datasets.cache import Prepared
from metabench.datasets.omniglot import load_omniglot, prepare_omniglot, split_characters, verify_omniglot

SIZES = {"vinyals": {"train": 1028, "val": 172, "test": 423, "trainval": 1200},
         "maml": {"train": 1100, "val": 100, "test": 423, "trainval": 1200}}
CLASSES = {"vinyals": {"train": 4112, "val": 688, "test": 1692, "trainval": 4800},
           "maml": {"train": 4400, "val": 100, "test": 423, "trainval": 4800}}
# A few real characters for the layout fixtures: one alphabet from each set, two characters each.
TINY = {"background": ["Greek/character01", "Greek/character02"],
        "evaluation": ["Gurmukhi/character01", "Gurmukhi/character42"]}


@pytest.fixture(scope="module")
def root(data_root: Path) -> Path:
    return data_root / "omniglot"


@pytest.fixture(scope="module")
def prepared(root: Path, cache_dir: Path) -> Prepared:
    start = time.perf_counter()
    result = prepare_omniglot(root, cache_dir)
    print(f"\nprepare_omniglot (decode or cache hit): {time.perf_counter() - start:.2f} s")
    return result


def _tiny_entries(root: Path) -> dict[str, dict[str, bytes]]:
    """``set -> {"Alphabet/characterNN/file.png": bytes}`` for the TINY characters, read from the real zips."""
    entries: dict[str, dict[str, bytes]] = {}
    for set_name, characters in TINY.items():
        with zipfile.ZipFile(root / f"images_{set_name}.zip") as archive:
            prefix = f"images_{set_name}/"
            entries[set_name] = {name[len(prefix):]: archive.read(name) for name in archive.namelist()
                                 if name.endswith(".png") and name[len(prefix):].rsplit("/", 1)[0] in characters}
    return entries


def _write_zips(folder: Path, entries: dict[str, dict[str, bytes]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for set_name, files in entries.items():
        with zipfile.ZipFile(folder / f"images_{set_name}.zip", "w") as archive:
            for rel, data in files.items():
                archive.writestr(f"images_{set_name}/{rel}", data)
    return folder


def _write_folders(folder: Path, entries: dict[str, dict[str, bytes]]) -> Path:
    for set_name, files in entries.items():
        for rel, data in files.items():
            path = folder / f"images_{set_name}" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def tiny(root: Path) -> dict[str, dict[str, bytes]]:
    return _tiny_entries(root)


def test_counts_and_meta(prepared: Prepared) -> None:
    characters, ids = prepared.meta["characters"], prepared.meta["image_ids"]
    assert prepared.images.shape == (32460, 1, 28, 28) and prepared.images.dtype == np.uint8
    assert len(characters) == 1623 == len(set(characters)) and characters == sorted(characters)
    alphabets = prepared.meta["alphabets"]
    assert (len(alphabets["background"]), len(alphabets["evaluation"])) == (30, 20)
    per_set = {s: sum(c.split("/")[0] in names for c in characters) for s, names in alphabets.items()}
    assert per_set == {"background": 964, "evaluation": 659}
    assert len(ids) == 32460
    for k in (0, 777, 1622):  # character k owns rows 20k:20k+20
        assert all(i.startswith(characters[k] + "/") for i in ids[20 * k:20 * k + 20])
    # Polarity: white background, dark strokes; LANCZOS leaves grey anti-aliased edges.
    sample = prepared.images[:2000]
    assert np.median(sample) == 255 and sample.min() < 50 and len(np.unique(sample)) > 50


def test_rows_match_their_image_ids(prepared: Prepared, root: Path) -> None:
    """Round trip: the row for an image id is that PNG, converted to "L" and LANCZOS-resized to 28x28."""
    ids = prepared.meta["image_ids"]
    rows = [0, 19, 9639, 20000, 32459]
    found = []
    for set_name in ("background", "evaluation"):
        with zipfile.ZipFile(root / f"images_{set_name}.zip") as archive:
            names = set(archive.namelist())
            for row in rows:
                name = f"images_{set_name}/{ids[row]}"
                if name in names:
                    with Image.open(io.BytesIO(archive.read(name))) as image:
                        expected = np.asarray(image.convert("L").resize((28, 28), Image.Resampling.LANCZOS))
                    np.testing.assert_array_equal(prepared.images[row, 0], expected)
                    found.append(row)
    assert sorted(found) == rows


@pytest.mark.parametrize("scheme", ["vinyals", "maml"])
def test_split_sizes_and_disjointness(prepared: Prepared, scheme: str) -> None:
    characters = prepared.meta["characters"]
    parts = {split: split_characters(scheme, split, characters) for split in SIZES[scheme]}
    assert {split: len(chars) for split, (chars, _) in parts.items()} == SIZES[scheme]
    train, val, test = (set(parts[s][0]) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(characters)
    assert set(parts["trainval"][0]) == train | val
    rotations = {split: rots for split, (_, rots) in parts.items()}
    if scheme == "vinyals":
        assert set(rotations.values()) == {(0, 90, 180, 270)}
    else:  # rotations are new classes in meta-training only
        assert rotations == {"train": (0, 90, 180, 270), "trainval": (0, 90, 180, 270), "val": (0,), "test": (0,)}


def test_maml_assignment_is_the_sha256_order(prepared: Prepared) -> None:
    characters = prepared.meta["characters"]
    digest = {c: hashlib.sha256(f"maml-omniglot:{c}".encode()).hexdigest() for c in characters}
    test, _ = split_characters("maml", "test", characters)
    assert set(test) == set(sorted(characters, key=digest.__getitem__)[1200:])
    assert len({c.split("/")[0] for c in test}) > 40  # drawn irrespective of alphabet, as in the paper
    assert split_characters("maml", "val", list(reversed(characters))) == split_characters("maml", "val", characters)


@pytest.mark.parametrize("split", ["train", "val", "test", "trainval"])
def test_vinyals_classes_equal_published_lists(root: Path, cache_dir: Path, data_root: Path, split: str) -> None:
    lines = (data_root / "splits" / "omniglot-vinyals" / f"{split}.txt").read_text().split()
    loaded = load_omniglot(split, root, cache_dir)
    assert loaded.name == f"omniglot/vinyals/{split}"
    assert len(loaded.class_names) == len(lines) == CLASSES["vinyals"][split]
    assert set(loaded.class_names) == set(lines)
    assert list(loaded.class_names) == sorted(loaded.class_names)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_maml_split_tensors(root: Path, cache_dir: Path, split: str) -> None:
    loaded = load_omniglot(split, root, cache_dir, scheme="maml")
    assert loaded.name == f"omniglot/maml/{split}" and loaded.num_classes == CLASSES["maml"][split]
    assert loaded.images.shape == (20 * loaded.num_classes, 1, 28, 28) and loaded.images.dtype == torch.uint8
    assert (loaded.counts == 20).all()
    if split != "train":
        assert all(name.endswith("/rot000") for name in loaded.class_names)


def test_split_tensor_layout_and_rotations(root: Path, cache_dir: Path, prepared: Prepared) -> None:
    loaded = load_omniglot("test", root, cache_dir)
    assert loaded.images.shape == (1692 * 20, 1, 28, 28) and loaded.images.dtype == torch.uint8
    assert (loaded.counts == 20).all() and loaded.offsets[-1] == loaded.images.shape[0]
    names = loaded.class_names
    k0 = names.index("Gurmukhi/character42/rot000")
    assert names[k0 + 1:k0 + 4] == tuple(f"Gurmukhi/character42/rot{d:03d}" for d in (90, 180, 270))
    # Image ids: the drawing's file plus the rotation, consistent with the class.
    pattern = re.compile(r"Gurmukhi/character42/\d{4}_\d{2}\.png@rot090")
    block = slice(loaded.offsets[k0 + 1], loaded.offsets[k0 + 2])
    assert all(pattern.fullmatch(i) for i in loaded.image_ids[block])
    # rot000 is the cached base image, unchanged.
    base_row = prepared.meta["characters"].index("Gurmukhi/character42") * 20
    base = loaded.images[loaded.offsets[k0]:loaded.offsets[k0 + 1]]
    np.testing.assert_array_equal(base.numpy(), prepared.images[base_row:base_row + 20])
    for r in (1, 2, 3):  # rotDDD = torch.rot90 by DDD/90 quarter turns
        rotated = loaded.images[loaded.offsets[k0 + r]:loaded.offsets[k0 + r + 1]]
        assert torch.equal(rotated, torch.rot90(base, r, dims=(-2, -1)))
    # Direction: counter-clockwise, like PIL's Image.rotate (used by Prototypical Networks)...
    rot090 = loaded.images[loaded.offsets[k0 + 1], 0].numpy()
    pil = np.asarray(Image.fromarray(base[0, 0].numpy()).rotate(90))
    np.testing.assert_array_equal(rot090, pil)
    # ...and by hand: the top-right pixel of the original lands top-left.
    original = base[0, 0].numpy()
    np.testing.assert_array_equal(rot090[0, :], original[:, -1])


def test_cached_load_time(root: Path, cache_dir: Path, prepared: Prepared) -> None:
    """Reports the load time once the cache exists (no assertion on time: machines differ)."""
    timings = {}
    for scheme, split in (("vinyals", "trainval"), ("vinyals", "test"), ("maml", "test")):
        start = time.perf_counter()
        loaded = load_omniglot(split, root, cache_dir, scheme=scheme)
        timings[f"{scheme}/{split}"] = time.perf_counter() - start
        assert loaded.num_classes == CLASSES[scheme][split]
    print("\nload_omniglot after cache: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))


@pytest.mark.slow  # decodes all 32,460 PNGs again: ~5 s of CPU, 14 s wall on a busy 2-core machine
def test_verify_real_data(root: Path) -> None:
    report = verify_omniglot(root)
    assert report["problems"] == []
    assert report["sets"]["background"]["characters"] == 964
    assert report["sets"]["evaluation"]["characters"] == 659
    assert (report["alphabets"], report["characters"], report["images"]) == (50, 1623, 32460)
    assert report["image_sizes"] == {"105x105": 32460}
    for set_name in ("background", "evaluation"):
        path = root / f"images_{set_name}.zip"
        assert report["sets"][set_name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_layouts_give_identical_tensors(tiny: dict[str, dict[str, bytes]], prepared: Prepared,
                                        tmp_path: Path) -> None:
    roots = {"zips": _write_zips(tmp_path / "zips", tiny),
             "folders": _write_folders(tmp_path / "folders", tiny),
             "torchvision folders": _write_folders(tmp_path / "tv" / "omniglot-py", tiny).parent,
             "torchvision zips": _write_zips(tmp_path / "tvz" / "omniglot-py", tiny).parent}
    results = {name: prepare_omniglot(path, tmp_path / f"cache-{i}") for i, (name, path) in enumerate(roots.items())}
    reference = results["zips"]
    assert reference.images.shape == (80, 1, 28, 28)
    assert reference.meta["characters"] == sorted(TINY["background"] + TINY["evaluation"])
    for name, result in results.items():
        np.testing.assert_array_equal(result.images, reference.images, err_msg=name)
        assert {k: v for k, v in result.meta.items() if k != "key"} == \
            {k: v for k, v in reference.meta.items() if k != "key"}, name  # "key" names the cache entry
    # The same rows as in the full decode of the real release.
    full_rows = {image_id: row for row, image_id in enumerate(prepared.meta["image_ids"])}
    rows = [full_rows[i] for i in reference.meta["image_ids"]]
    np.testing.assert_array_equal(reference.images, prepared.images[rows])
    # A split needs the full release: the tiny copy is refused with the missing characters named.
    with pytest.raises(DatasetError, match="not in the data"):
        load_omniglot("val", roots["zips"], tmp_path / "cache-0")
    with pytest.raises(DatasetError, match="needs all 1623"):
        load_omniglot("test", roots["zips"], tmp_path / "cache-0", scheme="maml")


def test_unknown_scheme_or_split_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown split scheme 'ravi'.*maml.*vinyals"):
        load_omniglot("train", tmp_path, scheme="ravi")
    with pytest.raises(DatasetError, match=r"unknown split 'training'.*'train', 'val', 'test', 'trainval'"):
        load_omniglot("training", tmp_path)


def test_missing_root_and_wrong_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        prepare_omniglot(tmp_path / "nowhere", tmp_path / "cache")
    monkeypatch.delenv("METABENCH_DATA", raising=False)
    with pytest.raises(DatasetError, match="METABENCH_DATA"):
        prepare_omniglot(None, tmp_path / "cache")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"no Omniglot files in .*empty.*images_background\.zip.*omniglot-py"):
        prepare_omniglot(empty, tmp_path / "cache")
    with pytest.raises(DatasetError, match="no Omniglot files"):
        verify_omniglot(empty)


def test_one_set_missing_names_what_was_found(tiny: dict[str, dict[str, bytes]], tmp_path: Path) -> None:
    root = _write_zips(tmp_path / "half", {"background": tiny["background"]})
    with pytest.raises(DatasetError, match=r"found only images_background\.zip"):
        prepare_omniglot(root, tmp_path / "cache")


def test_images_at_wrong_depth_are_refused(tiny: dict[str, dict[str, bytes]], tmp_path: Path) -> None:
    flat = {s: {rel.split("/", 1)[1]: data for rel, data in files.items()} for s, files in tiny.items()}
    root = _write_zips(tmp_path / "flat", flat)  # images_<set>/characterNN/file.png: no alphabet level
    with pytest.raises(DatasetError, match=r"images_background/character01/\d+_01\.png is not at"):
        prepare_omniglot(root, tmp_path / "cache")
    with pytest.raises(DatasetError, match="no entries under images_background/"):
        prepare_omniglot(_write_zips(tmp_path / "renamed", {"background": {}, "evaluation": {}}), tmp_path / "c")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png_is_named(tiny: dict[str, dict[str, bytes]], tmp_path: Path, damage: str) -> None:
    files = {s: dict(f) for s, f in tiny.items()}
    victim = sorted(files["evaluation"])[5]
    data = files["evaluation"][victim]
    files["evaluation"][victim] = b"not a png at all" if damage == "garbage" else data[:len(data) // 2]
    root = _write_zips(tmp_path / "bad", files)
    with pytest.raises(DatasetError, match=re.escape(f"images_evaluation/{victim}")):
        prepare_omniglot(root, tmp_path / "cache")
    report = verify_omniglot(root)
    assert any(victim in problem for problem in report["problems"])
    assert any("964" in problem for problem in report["problems"])  # the tiny copy is not the full release


def test_characters_without_20_drawings_are_refused(tiny: dict[str, dict[str, bytes]], tmp_path: Path) -> None:
    files = {s: dict(f) for s, f in tiny.items()}
    del files["background"][sorted(files["background"])[0]]
    with pytest.raises(DatasetError, match=r"Greek/character01 has 19 drawings, expected 20"):
        prepare_omniglot(_write_folders(tmp_path / "short", files), tmp_path / "cache")


def test_bad_image_size(root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="image_size must be a positive int"):
        prepare_omniglot(root, tmp_path, image_size=0)
