"""Few-shot segmentation data: masks in ImageSplit, per-pixel episode targets, the synthetic set, and the
FSS-1000 / fss-mini / PASCAL-5i readers (on fss-mini and on layout fixtures built in tmp_path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metabench.datasets.base import DatasetError, ImageSplit
from metabench.datasets.episodes import EpisodeSampler, EpisodeSpec
from metabench.datasets.fss import fss_1000_classes, load_fss_1000, load_fss_mini, verify_fss_1000, verify_fss_mini
from metabench.datasets.pascal5i import fold_classes, load_pascal_5i, verify_pascal_5i
from metabench.datasets.preview import episode_grid
from metabench.datasets.registry import get_dataset
from metabench.datasets.synthetic_seg import make_segmentation, render_class

SPLITS = ("train", "val", "test")


def _toy_split(masks: torch.Tensor | None = None) -> ImageSplit:
    """3 classes x 4 images of 2x3 pixels; image row r has every pixel = r; mask row r: known pattern."""
    n = 12
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 3).contiguous()
    if masks is None:
        masks = torch.zeros(n, 2, 3, dtype=torch.uint8)
        masks[:, 0, 0] = 1  # one foreground pixel per image
        masks[:, 1, 2] = 255  # one ignored pixel
        masks[torch.arange(n) % 2 == 0, 0, 1] = 1  # even rows have a second foreground pixel
    return ImageSplit("toy-seg", images, np.array([0, 4, 8, 12]), ("a", "b", "c"),
                      tuple(f"i{r}" for r in range(n)), masks)


# ------------------------------------------------------------------------------------ ImageSplit masks


def test_image_split_validates_masks() -> None:
    split = _toy_split()
    assert split.is_segmentation and split.to("cpu").masks is not None
    assert torch.equal(split.to("cpu").masks, split.masks)
    with pytest.raises(DatasetError, match="uint8"):
        _toy_split(torch.zeros(12, 2, 3, dtype=torch.int64))
    with pytest.raises(DatasetError, match=r"\[12, 2, 3\]"):
        _toy_split(torch.zeros(12, 3, 2, dtype=torch.uint8))
    bad = torch.zeros(12, 2, 3, dtype=torch.uint8)
    bad[7, 1, 1] = 2
    with pytest.raises(DatasetError, match="row 7 holds value 2"):
        _toy_split(bad)


def test_gather_gives_per_pixel_targets() -> None:
    split = _toy_split()
    sampler = EpisodeSampler(split, EpisodeSpec(ways=2, shots=1, queries=2))
    indices = sampler.fixed(seed=0, count=3)
    batch = sampler.gather(indices)
    assert batch.support_y.shape == (3, 2, 2, 3) and batch.query_y.shape == (3, 4, 2, 3)
    assert batch.support_y.dtype == torch.int64 and batch.support_x.shape == (3, 2, 3, 2, 3)
    for t in range(3):
        for y, rows, per in ((batch.support_y, indices.support, 1), (batch.query_y, indices.query, 2)):
            for j, row in enumerate(rows[t]):
                label = j // per
                assert int(batch.classes[t, label]) == int(row) // 4  # the row belongs to the episode's class
                expected = split.masks[row].long()
                expected[expected == 1] = label + 1
                assert torch.equal(y[t, j], expected)
    assert set(batch.query_y.unique().tolist()) == {0, 1, 2, 255}
    # The images of a row are the row number: targets and images stay aligned.
    assert torch.equal(batch.support_x[:, :, 0, 0, 0].long(), torch.as_tensor(indices.support))


def test_gather_on_another_device_copies_masks_once() -> None:
    split = _toy_split()
    sampler = EpisodeSampler(split, EpisodeSpec(ways=1, shots=2, queries=1))
    indices = sampler.fixed(seed=1, count=2)
    meta = sampler.gather(indices, split.images.to("meta"))  # the index_select path, shapes only
    assert meta.query_y.shape == (2, 1, 2, 3) and meta.query_y.device.type == "meta"
    assert list(sampler._mask_copies) == ["meta"]
    if torch.cuda.is_available():
        cpu, gpu = sampler.gather(indices), sampler.gather(indices, split.images.cuda())
        assert torch.equal(cpu.support_y, gpu.support_y.cpu()) and torch.equal(cpu.query_x, gpu.query_x.cpu())


def test_classification_gather_is_unchanged() -> None:
    split = ImageSplit("toy", torch.zeros(12, 1, 2, 2, dtype=torch.uint8), np.array([0, 4, 8, 12]),
                       ("a", "b", "c"), tuple(map(str, range(12))))
    batch = EpisodeSampler(split, EpisodeSpec(2, 1, 1)).gather(EpisodeSampler(split, EpisodeSpec(2, 1, 1)).fixed(0, 2))
    assert batch.support_y.tolist() == [[0, 1], [0, 1]]


# ------------------------------------------------------------------------------------------ synthetic-seg


def test_synthetic_seg_is_deterministic_and_class_stable(tmp_path: Path) -> None:
    a = make_segmentation("test", seed=3, num_classes=3, images_per_class=4, image_size=32)
    b = make_segmentation("test", seed=3, num_classes=5, images_per_class=6, image_size=32, cache_dir=tmp_path)
    assert a.name == "synthetic-seg/s3/test/32px" and a.images.shape == (12, 3, 32, 32)
    assert a.masks.shape == (12, 32, 32) and set(a.masks.unique().tolist()) == {0, 1}
    images, masks = render_class("test", 1, seed=3, count=6, image_size=32)
    assert torch.equal(a.images[4:8], torch.from_numpy(images[:4]))
    assert torch.equal(a.masks[4:8], torch.from_numpy(masks[:4]))
    assert torch.equal(b.images[:6], torch.from_numpy(render_class("test", 0, 3, 6, 32)[0]))
    again = make_segmentation("test", seed=3, num_classes=5, images_per_class=6, image_size=32, cache_dir=tmp_path)
    assert torch.equal(again.images, b.images) and torch.equal(again.masks, b.masks)
    fg = a.masks.float().mean(dim=(1, 2))
    assert bool((fg > 0.02).all()) and bool((fg < 0.6).all())  # an object, never the whole image
    other = make_segmentation("val", seed=3, num_classes=3, images_per_class=4, image_size=32)
    assert not torch.equal(other.images, a.images) and set(other.class_names).isdisjoint(a.class_names)
    with pytest.raises(DatasetError, match="image_size"):
        make_segmentation("test", image_size=8)


# ----------------------------------------------------------------------------------------------- fss-mini


def test_fss_mini_reader(data_root: Path, cache_dir: Path) -> None:
    defined = json.loads((data_root / "fss-mini" / "splits.json").read_text())
    loaded = {s: load_fss_mini(s, root=data_root, cache_dir=cache_dir) for s in SPLITS}
    for split, part in loaded.items():
        assert part.name == f"fss-mini/{split}/128px"
        assert part.class_names == tuple(defined[split])
        assert part.images.shape == (10 * len(defined[split]), 3, 128, 128)
        assert part.counts.tolist() == [10] * part.num_classes
        assert part.masks.shape == (part.images.shape[0], 128, 128)
        assert set(part.masks.unique().tolist()) == {0, 1}
        assert bool((part.masks.flatten(1).float().mean(1) > 0).all())  # every mask has an object
    assert [len(loaded[s].class_names) for s in SPLITS] == [20, 5, 8]
    names = [set(loaded[s].class_names) for s in SPLITS]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    # Native size: pixels and masks exactly as in the files.
    native = load_fss_mini("test", root=data_root, cache_dir=cache_dir, image_size=224)
    row = native.image_ids.index("davis_dog/3")
    folder = data_root / "fss-mini" / "davis_dog"
    jpeg = np.asarray(Image.open(folder / "3.jpg")).transpose(2, 0, 1).copy()
    assert torch.equal(native.images[row], torch.from_numpy(jpeg))
    png = (np.asarray(Image.open(folder / "3.png")) > 0).astype(np.uint8)
    assert torch.equal(native.masks[row], torch.from_numpy(png))
    # The image size names the split, so it names the fixed episodes too.
    spec = EpisodeSpec(1, 1, 1)
    assert EpisodeSampler(native, spec).digest(0, 5) != EpisodeSampler(loaded["test"], spec).digest(0, 5)
    two_way = EpisodeSampler(loaded["test"], EpisodeSpec(2, 1, 2))
    assert set(two_way.gather(two_way.fixed(0, 4)).query_y.unique().tolist()) == {0, 1, 2}
    assert verify_fss_mini(data_root)["problems"] == []


def test_fss_mini_custom_split(data_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    splits = {"train": ["davis_dog"], "val": ["davis_goat"], "test": ["camvid_car", "davis_camel"]}
    part = load_fss_mini("test", root=data_root, cache_dir=cache_dir, image_size=32, splits=splits)
    assert part.class_names == ("camvid_car", "davis_camel") and part.name.startswith("fss-mini@")
    (tmp_path / "s.json").write_text(json.dumps({**splits, "val": ["davis_dog"]}))
    with pytest.raises(DatasetError, match="davis_dog"):
        load_fss_mini("test", root=data_root, cache_dir=cache_dir, split_file=tmp_path / "s.json")


# ------------------------------------------------------------------------------------ FSS-1000 fixture


def _encoded(image: Image.Image, fmt: str) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_fss_1000_reader_on_layout_fixture(tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "fss-1000"
    rng = np.random.default_rng(0)
    # 28x28 instead of FSS-1000's 224x224 keeps the 2,400-pair fixture fast; the reader does not care.
    jpg = _encoded(Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)), "JPEG")
    square = np.zeros((28, 28), dtype=np.uint8)
    square[6:18, 8:16] = 255
    png = _encoded(Image.fromarray(square), "PNG")
    rgb_mask = np.zeros((28, 28, 3), dtype=np.uint8)
    rgb_mask[0:2, 0:4, 1] = 7  # faint, one channel: still foreground
    test_classes = fss_1000_classes("test")
    for name in test_classes:
        (root / name).mkdir(parents=True)
        for n in range(1, 11):
            (root / name / f"{n}.jpg").write_bytes(jpg)
            (root / name / f"{n}.png").write_bytes(png)
    Image.fromarray(rgb_mask).save(root / test_classes[0] / "10.png")
    split = load_fss_1000("test", root=tmp_path, cache_dir=cache_dir, image_size=14)
    assert split.name == "fss-1000/test/14px" and split.num_classes == 240 and split.images.shape == (2400, 3, 14, 14)
    assert split.image_ids[:3] == (f"{test_classes[0]}/1", f"{test_classes[0]}/2", f"{test_classes[0]}/3")
    assert split.image_ids[9] == f"{test_classes[0]}/10"  # numeric order, not 1, 10, 2, ...
    assert int(split.masks[0].sum()) == 6 * 4  # the 12x8 square at half size (nearest)
    assert int(split.masks[9].sum()) == 2 and int(split.masks[9, :1, :2].sum()) == 2
    with pytest.raises(DatasetError, match="class folder is missing"):
        load_fss_1000("train", root=tmp_path, cache_dir=cache_dir)
    (root / test_classes[1] / "4.png").unlink()
    with pytest.raises(DatasetError, match="has no mask 4.png"):
        load_fss_1000("test", root=tmp_path, cache_dir=cache_dir, image_size=8)
    problems = verify_fss_1000(tmp_path)["problems"]
    assert any("has no mask 4.png" in p for p in problems)
    assert any("class folder is missing" in p for p in problems)  # train and val classes
    assert any("are not 224x224" in p for p in problems)


def test_fss_1000_split_matches_published_lists(data_root: Path) -> None:
    files = {"train": "trn", "val": "val", "test": "test"}
    ours = {s: fss_1000_classes(s) for s in SPLITS}
    for split, name in files.items():
        published = (data_root / "splits" / "fss-1000" / f"{name}.txt").read_text().split()
        assert sorted(published) == list(ours[split])
    assert [len(ours[s]) for s in SPLITS] == [520, 240, 240] and len(set().union(*ours.values())) == 1000


# ----------------------------------------------------------------------------------- PASCAL-5i fixture


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """VOC layout from the 40 real sample label maps (copied at test time) and random JPEGs of their sizes;
    lists in HSNet's format: val/fold0 = the real lines of the sample, the other lists built from the
    classes each sample map holds (even-numbered samples and those with two base classes go to trn, the
    others to val)."""
    data = tmp_path_factory.mktemp("pascal") / "data"
    voc = data / "pascal-5i"
    (voc / "JPEGImages").mkdir(parents=True)
    shutil.copytree(data_root / "pascal-5i-sample" / "SegmentationClassAug", voc / "SegmentationClassAug")
    ids = sorted(p.stem for p in (voc / "SegmentationClassAug").glob("*.png"))
    rng = np.random.default_rng(1)
    lists: dict[str, set[str]] = {f"{k}/fold{f}": set() for k in ("trn", "val") for f in range(4)}
    real = (data_root / "splits" / "pascal-5i" / "val" / "fold0.txt").read_text().split()
    lists["val/fold0"] = {line for line in real if line.split("__")[0] in ids}
    for i, image_id in enumerate(ids):
        labels = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{image_id}.png"))
        image = rng.integers(0, 255, (*labels.shape, 3), dtype=np.uint8)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg")
        classes = sorted(set(np.unique(labels).tolist()) - {0, 255})
        base = [c for c in classes if c > 5]
        for cls in classes:
            fold = (cls - 1) // 5
            kind = "trn" if i % 2 == 0 or len(base) > 1 else "val"  # images with 2 base classes train
            if not (kind == "val" and fold == 0):
                lists[f"{kind}/fold{fold}"].add(f"{image_id}__{cls:02d}")
    for key, lines in lists.items():
        path = data / "splits" / "pascal-5i" / f"{key}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in sorted(lines)))
    return data


def test_pascal_5i_reader_on_layout_fixture(pascal_root: Path, cache_dir: Path) -> None:
    lists = pascal_root / "splits" / "pascal-5i"
    test_lines = (lists / "val" / "fold0.txt").read_text().split()
    test = load_pascal_5i("test", root=pascal_root, cache_dir=cache_dir, fold=0, image_size=64)
    assert test.name == "pascal-5i/fold0/test/64px" and test.images.shape == (len(test_lines), 3, 64, 64)
    assert set(test.class_names) <= {"aeroplane", "bicycle", "bird", "boat", "bottle"}
    assert set(test.masks.unique().tolist()) == {0, 1, 255}
    assert len(set(test.image_ids)) == len(test.image_ids)
    for row, image_id in enumerate(test.image_ids):
        image, cls = image_id.split("__")
        labels = np.asarray(Image.open(pascal_root / "pascal-5i" / "SegmentationClassAug" / f"{image}.png")
                            .resize((64, 64), Image.Resampling.NEAREST))
        expected = np.where(labels == int(cls), 1, np.where(labels == 255, 255, 0))
        assert np.array_equal(test.masks[row].numpy(), expected)
        assert f"{image}__{int(cls):02d}" in test_lines
    train = load_pascal_5i("train", root=pascal_root, cache_dir=cache_dir, fold=0, image_size=64)
    assert train.name == "pascal-5i/fold0/train/64px"
    assert not set(train.class_names) & set(test.class_names) and train.num_classes > 0
    # One VOC image under two classes: two rows, two different binary masks.
    stems = [i.split("__")[0] for i in train.image_ids]
    twice = next(s for s in stems if stems.count(s) > 1)
    rows = [r for r, s in enumerate(stems) if s == twice]
    assert torch.equal(train.images[rows[0]], train.images[rows[1]])
    assert not torch.equal(train.masks[rows[0]], train.masks[rows[1]])
    val = load_pascal_5i("val", root=pascal_root, cache_dir=cache_dir, fold=0, image_size=64)
    novel = load_pascal_5i("val", root=pascal_root, cache_dir=cache_dir, fold=0, image_size=64, val="novel")
    assert not set(val.class_names) & set(test.class_names) and not set(val.image_ids) & set(train.image_ids)
    assert novel.name == "pascal-5i/fold0/val-novel/64px" and novel.image_ids == test.image_ids
    sampler = EpisodeSampler(test, EpisodeSpec(1, 1, 1))
    assert set(sampler.gather(sampler.fixed(0, 20)).query_y.unique().tolist()) <= {0, 1, 255}
    assert verify_pascal_5i(pascal_root)["problems"] == []


def test_pascal_5i_errors(pascal_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="fold must be one of"):
        load_pascal_5i("test", root=pascal_root, cache_dir=cache_dir, fold=4)
    bad = tmp_path / "lists"
    shutil.copytree(pascal_root / "splits" / "pascal-5i", bad)
    (bad / "val" / "fold0.txt").write_text("2007_000033__07\n")
    with pytest.raises(DatasetError, match=r"fold0.txt, line 1: class 7 is not in fold 0"):
        load_pascal_5i("test", root=pascal_root, cache_dir=cache_dir, lists=bad)
    with pytest.raises(DatasetError, match="no per-fold image lists"):
        load_pascal_5i("test", root=pascal_root / "pascal-5i", cache_dir=cache_dir, lists=tmp_path / "none")


def test_pascal_5i_folds_match_published_lists(data_root: Path) -> None:
    for fold in range(4):
        for kind in ("trn", "val"):
            lines = (data_root / "splits" / "pascal-5i" / kind / f"fold{fold}.txt").read_text().split()
            assert sorted({int(line.rsplit("__", 1)[1]) for line in lines}) == list(fold_classes(fold))


# ------------------------------------------------------------------------------------ registry, preview


def test_registry_and_preview() -> None:
    for name in ("synthetic-seg", "fss-mini", "fss-1000", "pascal-5i"):
        info = get_dataset(name)
        assert info.task == "segmentation" and info.splits == SPLITS
        assert info.needs_root == (name != "synthetic-seg")
    assert get_dataset("omniglot").task == "classification"
    split = get_dataset("synthetic-seg").load("val", num_classes=2, images_per_class=3, image_size=16)
    sampler = EpisodeSampler(split, EpisodeSpec(1, 1, 2))
    grid = episode_grid(sampler, sampler.fixed(0, 1))
    assert grid.shape[0] == 3 and grid.shape[2] == 2 + 4 * 18
