"""mini-ImageNet: the full Ravi & Larochelle split on real data, and layout parity on tiny real-image fixtures."""

from __future__ import annotations

import csv
import hashlib
import io
import pickle
import random
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metabench.datasets.base import DatasetError, ImageSplit
from metabench.datasets.miniimagenet import (
    SPLITS,
    detect_layout,
    load_mini_imagenet,
    prepare_mini_imagenet,
    verify_mini_imagenet,
)

TINY_CLASSES, TINY_IMAGES = 3, 4


def _pil_chw(data: bytes) -> np.ndarray:
    """The reference decode, written independently of the reader: PIL -> RGB -> [3, H, W]."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


# ------------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def mini_root(data_root: Path) -> Path:
    root = data_root / "mini-imagenet"
    if not (root / "images.zip").is_file():
        pytest.fail(f"{root} lacks images.zip: the shared data is incomplete")
    return root


@pytest.fixture(scope="module")
def full_splits(mini_root: Path, cache_dir: Path) -> dict[str, tuple[ImageSplit, float]]:
    """All three real splits, decoded once per session (the cache makes later loads cheap)."""
    loaded = {}
    for split in SPLITS:
        start = time.perf_counter()
        loaded[split] = (load_mini_imagenet(split, mini_root, cache_dir), time.perf_counter() - start)
    return loaded


@pytest.mark.slow
def test_full_ravi_split(full_splits: dict[str, tuple[ImageSplit, float]], mini_root: Path,
                         cache_dir: Path) -> None:
    expected = {"train": 64, "val": 16, "test": 20}
    for split, (data, _) in full_splits.items():
        assert data.name == f"mini-imagenet/ravi/{split}"
        assert data.num_classes == expected[split] and data.counts.tolist() == [600] * expected[split]
        assert data.images.dtype == torch.uint8 and tuple(data.images.shape) == (600 * expected[split], 3, 84, 84)
        assert list(data.class_names) == sorted(data.class_names)
        assert data.image_ids[:2] == (f"{data.class_names[0]}/0000", f"{data.class_names[0]}/0001")
        assert len(set(data.image_ids)) == len(data.image_ids)
    classes = {split: set(data.class_names) for split, (data, _) in full_splits.items()}
    assert not classes["train"] & classes["val"] and not classes["train"] & classes["test"]
    assert not classes["val"] & classes["test"]

    # Spot-check rows against an independent decode of the zip entry: image k of a class is its k-th
    # file name in sorted order.
    rng = random.Random(0)
    with zipfile.ZipFile(mini_root / "images.zip") as archive:
        for split, (data, _) in full_splits.items():
            with open(mini_root / f"{split}.csv", newline="") as handle:
                rows = list(csv.DictReader(handle))
            for _ in range(5):
                k_class = rng.randrange(data.num_classes)
                wnid = data.class_names[k_class]
                names = sorted(r["filename"] for r in rows if r["label"] == wnid)
                k = rng.randrange(len(names))
                row = int(data.offsets[k_class]) + k
                assert data.image_ids[row] == f"{wnid}/{k:04d}"
                expected_image = _pil_chw(archive.read(f"images/{names[k]}"))
                np.testing.assert_array_equal(data.images[row].numpy(), expected_image)

    # The cache answers a second load in well under the "few seconds" budget.
    for split in SPLITS:
        start = time.perf_counter()
        again = load_mini_imagenet(split, mini_root, cache_dir)
        elapsed = time.perf_counter() - start
        assert elapsed < 5.0, f"cached load of {split} took {elapsed:.1f} s"
        assert again.image_ids == full_splits[split][0].image_ids
        np.testing.assert_array_equal(again.images[::997].numpy(), full_splits[split][0].images[::997].numpy())


@pytest.mark.slow
def test_verify_real_data(mini_root: Path) -> None:
    report = verify_mini_imagenet(mini_root)
    assert report["layout"] == "ravi" and report["problems"] == []
    for split, classes in {"train": 64, "val": 16, "test": 20}.items():
        facts = report["splits"][split]
        assert facts["classes"] == classes and facts["images"] == classes * 600
        assert facts["images_per_class"] == {"min": 600, "max": 600}
        assert facts["image_sizes"] == {"84x84": classes * 600} and facts["ravi_classes"]
    assert report["sha256"]["train.csv"] == "498519cd8e49ce97ed26a4a3638966698ae41ab35e9c68538319fc9b46ba7d2f"
    assert set(report["sha256"]) == {"train.csv", "val.csv", "test.csv", "images.zip"}


# -------------------------------------------------------------------------- tiny fixtures from real images


@pytest.fixture(scope="module")
def tiny_source(data_root: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """``{split: {wnid: {filename: jpeg bytes}}}``: 3 classes x 4 real images per split, read from the zip."""
    root = data_root / "mini-imagenet"
    chosen: dict[str, dict[str, dict[str, bytes]]] = {}
    with zipfile.ZipFile(root / "images.zip") as archive:
        for split in SPLITS:
            with open(root / f"{split}.csv", newline="") as handle:
                rows = list(csv.DictReader(handle))
            wnids = sorted({r["label"] for r in rows})
            picks = [wnids[-1], wnids[0], wnids[len(wnids) // 2]]  # not in sorted order on purpose
            chosen[split] = {}
            for wnid in picks:
                names = [r["filename"] for r in rows if r["label"] == wnid]
                names = [names[i] for i in (37, 3, 511, 120)]  # spread out and unsorted
                chosen[split][wnid] = {n: archive.read(f"images/{n}") for n in names}
    return chosen


def _write_csvs(root: Path, source: dict[str, dict[str, dict[str, bytes]]]) -> None:
    for split, classes in source.items():
        rows = [(name, wnid) for wnid, files in classes.items() for name in files]
        random.Random(split).shuffle(rows)  # row order must not matter
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            writer.writerows(rows)


def _ravi_zip(root: Path, source: dict[str, dict[str, dict[str, bytes]]]) -> Path:
    root.mkdir()
    unique = {name: data for classes in source.values() for files in classes.values() for name, data in files.items()}
    entries = sorted(unique.items())
    random.Random(1).shuffle(entries)
    with zipfile.ZipFile(root / "images.zip", "w") as archive:
        for name, data in entries:
            archive.writestr(f"images/{name}", data)
    _write_csvs(root, source)
    return root


def _ravi_folder(root: Path, source: dict[str, dict[str, dict[str, bytes]]]) -> Path:
    (root / "images").mkdir(parents=True)
    for classes in source.values():
        for files in classes.values():
            for name, data in files.items():
                (root / "images" / name).write_bytes(data)
    _write_csvs(root, source)
    return root


def _folders(root: Path, source: dict[str, dict[str, dict[str, bytes]]]) -> Path:
    for split, classes in source.items():
        for wnid, files in classes.items():
            (root / split / wnid).mkdir(parents=True)
            for name, data in files.items():
                (root / split / wnid / name).write_bytes(data)
    return root


def _l2l(root: Path, source: dict[str, dict[str, dict[str, bytes]]]) -> Path:
    """learn2learn caches: rows stored in a shuffled order, class_dict listing each class's rows by file name."""
    root.mkdir()
    for split, classes in source.items():
        items = [(wnid, name, data) for wnid, files in classes.items() for name, data in files.items()]
        order = list(range(len(items)))
        random.Random(2).shuffle(order)
        image_data = np.stack([_pil_chw(items[i][2]).transpose(1, 2, 0) for i in order])  # [N, 84, 84, 3]
        class_dict: dict[str, list[int]] = {}
        for wnid in classes:  # insertion order = unsorted wnids
            rows = [(items[i][1], row) for row, i in enumerate(order) if items[i][0] == wnid]
            class_dict[wnid] = [row for _, row in sorted(rows)]
        name = {"train": "train", "val": "validation", "test": "test"}[split]
        with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as handle:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, handle)
    return root


@pytest.mark.parametrize("split", SPLITS)
def test_three_layouts_give_identical_tensors_and_ids(tmp_path: Path, tiny_source: dict, split: str) -> None:
    roots = {
        "ravi-zip": _ravi_zip(tmp_path / "ravi-zip", tiny_source),
        "ravi-folder": _ravi_folder(tmp_path / "ravi-folder", tiny_source),
        "folders": _folders(tmp_path / "folders", tiny_source),
        "learn2learn": _l2l(tmp_path / "l2l", tiny_source),
    }
    assert [detect_layout(r) for r in roots.values()] == ["ravi", "ravi", "folders", "learn2learn"]
    loaded = {kind: load_mini_imagenet(split, root, tmp_path / "cache") for kind, root in roots.items()}

    classes = tiny_source[split]
    wnids = sorted(classes)
    expected = np.stack([_pil_chw(classes[w][n]) for w in wnids for n in sorted(classes[w])])
    expected_ids = tuple(f"{w}/{k:04d}" for w in wnids for k in range(TINY_IMAGES))
    for kind, data in loaded.items():
        assert data.name == f"mini-imagenet/ravi/{split}", kind
        assert data.class_names == tuple(wnids), kind
        assert data.offsets.tolist() == [0, 4, 8, 12], kind
        assert data.image_ids == expected_ids, kind
        assert data.images.dtype == torch.uint8 and tuple(data.images.shape) == (12, 3, 84, 84), kind
        np.testing.assert_array_equal(data.images.numpy(), expected, err_msg=kind)


def test_prepare_meta_and_cache_reuse(tmp_path: Path, tiny_source: dict) -> None:
    root = _folders(tmp_path / "folders", tiny_source)
    first = prepare_mini_imagenet("val", root, tmp_path / "cache")
    assert first.meta["layout"] == "folders" and first.meta["split"] == "val"
    assert first.meta["classes"] == sorted(tiny_source["val"]) and first.meta["offsets"] == [0, 4, 8, 12]
    npy = sorted((tmp_path / "cache" / "prepared").glob("mini-imagenet-val-*.npy"))
    assert len(npy) == 1
    stamp = npy[0].stat().st_mtime_ns
    prepare_mini_imagenet("val", root, tmp_path / "cache")
    assert npy[0].stat().st_mtime_ns == stamp  # served from the cache, not rebuilt

    # Replacing one image's content changes the key: the stale cache is not served.
    wnid = sorted(tiny_source["val"])[0]
    first_file = sorted((root / "val" / wnid).iterdir())[0]
    other = next(iter(tiny_source["val"][sorted(tiny_source["val"])[1]].values()))
    first_file.write_bytes(other)
    changed = load_mini_imagenet("val", root, tmp_path / "cache")
    np.testing.assert_array_equal(changed.images[0].numpy(), _pil_chw(other))


def test_images_not_84_are_resized_bicubic(tmp_path: Path, tiny_source: dict) -> None:
    root = _folders(tmp_path / "folders", tiny_source)
    wnid = sorted(tiny_source["test"])[0]
    first = sorted(tiny_source["test"][wnid])[0]
    big = Image.open(io.BytesIO(tiny_source["test"][wnid][first])).convert("RGB").resize((100, 90))
    (root / "test" / wnid / first).unlink()
    big.save(root / "test" / wnid / first.replace(".jpg", ".png"))  # same sort position, another format
    grey = Image.open(io.BytesIO(tiny_source["test"][wnid][sorted(tiny_source["test"][wnid])[1]])).convert("L")
    (root / "test" / wnid / sorted(tiny_source["test"][wnid])[1]).write_bytes(_jpeg(grey))
    data = load_mini_imagenet("test", root, tmp_path / "cache")
    expected = np.asarray(big.resize((84, 84), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    np.testing.assert_array_equal(data.images[0].numpy(), expected)
    grey_rgb = data.images[1].numpy()
    assert (grey_rgb[0] == grey_rgb[1]).all() and (grey_rgb[1] == grey_rgb[2]).all()  # L -> RGB replicates


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def test_verify_tiny_layouts(tmp_path: Path, tiny_source: dict) -> None:
    for make in (_ravi_zip, _folders, _l2l):
        root = make(tmp_path / make.__name__, tiny_source)
        report = verify_mini_imagenet(root)
        assert report["splits"]["train"] == {"classes": 3, "images": 12, "images_per_class": {"min": 4, "max": 4},
                                             "image_sizes": {"84x84": 12}, "ravi_classes": False}
        problems = report["problems"]
        assert "train: 3 classes, expected 64" in problems and "test: 3 classes, expected 20" in problems
        assert any("do not have 600 images" in p for p in problems)
        assert not any("share" in p for p in problems)
    zip_report = verify_mini_imagenet(tmp_path / "_ravi_zip")
    assert zip_report["layout"] == "ravi"
    csv_bytes = (tmp_path / "_ravi_zip" / "val.csv").read_bytes()
    assert zip_report["sha256"]["val.csv"] == hashlib.sha256(csv_bytes).hexdigest()
    assert set(verify_mini_imagenet(tmp_path / "_l2l")["sha256"]) == {
        "mini-imagenet-cache-train.pkl", "mini-imagenet-cache-validation.pkl", "mini-imagenet-cache-test.pkl"}


def test_verify_reports_overlapping_splits(tmp_path: Path, tiny_source: dict) -> None:
    source = dict(tiny_source)
    source["val"] = {**tiny_source["val"], **dict(list(tiny_source["train"].items())[:1])}
    root = _ravi_zip(tmp_path / "overlap", source)
    problems = verify_mini_imagenet(root)["problems"]
    assert any(p.startswith("train and val share 1 classes") for p in problems)
    assert any(p.startswith("train and val share 4 image files") for p in problems)


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_root_and_unknown_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_mini_imagenet("train", tmp_path / "absent", tmp_path / "cache")
    monkeypatch.delenv("METABENCH_DATA", raising=False)
    with pytest.raises(DatasetError, match="no data root"):
        load_mini_imagenet("train", None, tmp_path / "cache")
    with pytest.raises(DatasetError, match="unknown split 'validation'; valid splits: train, val, test"):
        load_mini_imagenet("validation", tmp_path, tmp_path / "cache")


def test_folder_matching_no_layout(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "pictures").mkdir()
    with pytest.raises(DatasetError) as info:
        load_mini_imagenet("train", tmp_path, tmp_path / "cache")
    message = str(info.value)
    for needle in ("matches no known layout", "'ravi'", "'folders'", "'learn2learn'", "images.zip",
                   "mini-imagenet-cache-", "notes.txt", "pictures/"):
        assert needle in message
    (tmp_path / "train.csv").write_text("filename,label\n")
    with pytest.raises(DatasetError, match="neither images.zip nor images/"):
        verify_mini_imagenet(tmp_path)


@pytest.mark.parametrize("make", [_ravi_zip, _ravi_folder, _folders])
def test_corrupt_jpeg_names_the_file(tmp_path: Path, tiny_source: dict, make) -> None:  # noqa: ANN001
    source = {s: {w: dict(f) for w, f in c.items()} for s, c in tiny_source.items()}
    wnid = sorted(source["train"])[1]
    name = sorted(source["train"][wnid])[2]
    source["train"][wnid][name] = source["train"][wnid][name][:600]  # truncated mid-scan
    root = make(tmp_path / "data", source)
    with pytest.raises(DatasetError, match=f"{name}: cannot decode image"):
        load_mini_imagenet("train", root, tmp_path / "cache")
    source["train"][wnid][name] = b"not a jpeg at all"
    root = make(tmp_path / "data2", source)
    with pytest.raises(DatasetError, match=f"{name}: cannot decode image"):
        load_mini_imagenet("train", root, tmp_path / "cache")
    # verify reads headers only: a truncated image may pass, but garbage is reported, not raised
    assert any(name in p for p in verify_mini_imagenet(root)["problems"])


@pytest.mark.parametrize("make", [_ravi_zip, _ravi_folder])
def test_csv_naming_a_missing_image(tmp_path: Path, tiny_source: dict, make) -> None:  # noqa: ANN001
    root = make(tmp_path / "data", tiny_source)
    with open(root / "test.csv", "a", newline="") as handle:
        handle.write("n9999999900000001.jpg,n99999999\n")
    with pytest.raises(DatasetError, match=r"test\.csv names 1 image\(s\) missing .*n9999999900000001\.jpg"):
        load_mini_imagenet("test", root, tmp_path / "cache")
    load_mini_imagenet("val", root, tmp_path / "cache")  # other splits still load
    assert any("n9999999900000001.jpg" in p for p in verify_mini_imagenet(root)["problems"])


def test_malformed_csv_and_missing_split_files(tmp_path: Path, tiny_source: dict) -> None:
    root = _ravi_zip(tmp_path / "data", tiny_source)
    (root / "val.csv").write_text("name,class\nx.jpg,n1\n")
    with pytest.raises(DatasetError, match=r"val\.csv: expected the header 'filename,label'"):
        load_mini_imagenet("val", root, tmp_path / "cache")
    (root / "test.csv").unlink()
    with pytest.raises(DatasetError, match=r"test\.csv, which is missing"):
        load_mini_imagenet("test", root, tmp_path / "cache")
    folders = _folders(tmp_path / "folders", tiny_source)
    for path in (folders / "test").rglob("*"):
        if path.is_file():
            path.unlink()
    with pytest.raises(DatasetError, match="class folder holds no images"):
        load_mini_imagenet("test", folders, tmp_path / "cache")


def test_learn2learn_bad_rows_and_payloads(tmp_path: Path) -> None:
    root = tmp_path / "l2l"
    root.mkdir()
    path = root / "mini-imagenet-cache-train.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"n01": [0, 5]}}, handle)
    with pytest.raises(DatasetError, match=r"cache-train\.pkl: class n01: row 5 is outside"):
        load_mini_imagenet("train", root, tmp_path / "cache")
    with open(path, "wb") as handle:  # rows as a list of images: one of them is not an image
        pickle.dump({"image_data": [np.zeros((84, 84, 3), np.uint8), np.zeros((84, 84), np.uint8)],
                     "class_dict": {"n01": [0, 1]}}, handle)
    with pytest.raises(DatasetError, match=r"cache-train\.pkl: row 1 is not a uint8 \[H, W, 3\] image"):
        load_mini_imagenet("train", root, tmp_path / "cache")
    with open(path, "wb") as handle:
        pickle.dump({"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {"n01": [0]},
                     "hook": Image.new("RGB", (2, 2))}, handle)  # a class outside the allowlist
    with pytest.raises(DatasetError, match=r"refusing to unpickle PIL\.Image\.\w+"):
        load_mini_imagenet("train", root, tmp_path / "cache")
    with pytest.raises(DatasetError, match=r"mini-imagenet-cache-validation\.pkl, which is missing"):
        load_mini_imagenet("val", root, tmp_path / "cache")
