"""Synthetic glyphs: an Omniglot-like few-shot set generated from a seed, needing no download.

Each class is a random "character" of 2-4 pen strokes (chains of quadratic Bezier curves between points of a
5x5 grid); each of its instances redraws those strokes with jittered control points, a random affine
distortion and its own pen width. Images are rendered with PIL at 4x resolution, box-downsampled, and stored
like Omniglot after the project's reader: uint8 ``[N, 1, 28, 28]``, white background 255, dark strokes.

Every class is generated from its own random stream keyed by (seed, split, class index), so splits never
share a class and a class never depends on how many other classes are generated.

Difficulty (the knobs below), measured on the 200 test classes, 5-way 1-shot: nearest neighbour on raw pixels
~38%; nearest centroid on a random-init Conv4's features ~45%, and a random-init Conv4 fine-tuned on the support
set (10 SGD steps, lr 0.4) ~48%; the same features after a Conv4 was trained as a 1000-way classifier on the
train classes (1000 steps of 128) ~84%; second-order MAML, 300 meta-iterations of 8 tasks, ~70%.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from metabench.datasets.base import DatasetError, ImageSplit, resolve_cache_dir
from metabench.datasets.cache import Prepared, load_or_prepare

SPLIT_CODES = {"train": 1, "val": 2, "test": 3}  # part of every class's seed: never renumber
DEFAULT_NUM_CLASSES = {"train": 1000, "val": 100, "test": 200}
GENERATOR_VERSION = 1  # bump whenever the drawing below changes: it keys caches and names the data
_STREAM_TAG = 0x676C7970  # "glyp": keeps these streams apart from any other SeedSequence use of the same seed

# Difficulty knobs, in glyph units (the 5x5 stroke grid spans [-1, 1]) unless stated.
SUPERSAMPLE = 4  # render at 4x, then box-downsample: anti-aliased strokes
GLYPH_EXTENT = 0.34  # glyph half-width as a fraction of the image side (Omniglot characters fill ~2/3)
GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)
PROTOTYPE_OFFSET = 0.12  # per-class displacement of grid points, so glyphs are not all on one lattice
CURVE_BEND = 0.6  # max perpendicular offset of a Bezier control point, relative to its chord length
STRAIGHT_PROB = 0.35  # share of segments drawn straight
JOIN_PROB = 0.5  # chance a stroke starts on a point of an earlier stroke (characters are connected)
INSTANCE_JITTER = 0.2  # per-instance displacement of every control point (uniform, +-)
MAX_ROTATION = 0.35  # tan(angle / 2): about +-39 degrees
SCALE_RANGE = (0.7, 1.2)
MAX_SHEAR = 0.3
MAX_SHIFT = 0.4  # about +-3.8 output pixels: defeats pixel matching, not a convolutional network
PEN_RANGE = (1.0, 3.5)  # stroke width in output pixels
PEN_STROKE_VARIATION = 0.3  # per-stroke pen width change (output pixels, +-)
CURVE_SAMPLES = 12  # points per Bezier segment


def _uniform(rng: np.random.Generator, low: float, high: float, size: int | tuple[int, ...]) -> np.ndarray:
    """Uniform floats in [low, high) built from ``random()`` alone (see :func:`class_rng`)."""
    return low + (high - low) * rng.random(size)


def _index(rng: np.random.Generator, n: int) -> int:
    """A uniform integer in [0, n) from one ``random()`` draw."""
    return min(int(rng.random() * n), n - 1)


def class_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The random stream of one class, keyed only by (seed, split, class index).

    PCG64 seeded through a SeedSequence yields the same bits on every machine and numpy version; numpy only
    promises stable *bits*, though, not stable results from Generator methods (their algorithms may change
    between releases). So this module draws only with ``random()`` (53 random bits scaled to [0, 1)) and
    builds every other distribution from it with plain arithmetic.
    """
    if split not in SPLIT_CODES:
        raise DatasetError(f"synthetic-glyphs: unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise DatasetError(f"synthetic-glyphs: seed must be a non-negative integer, got {seed!r}")
    if index < 0:
        raise DatasetError(f"synthetic-glyphs: class index must be non-negative, got {index}")
    entropy = [_STREAM_TAG, GENERATOR_VERSION, int(seed), SPLIT_CODES[split], int(index)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _prototype(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """A class's character: control points ``[M, 2]`` and, per stroke, the point indices of its segments
    (``[S, 3]`` rows of start, control, end; consecutive segments share an end point)."""
    offsets = _uniform(rng, -PROTOTYPE_OFFSET, PROTOTYPE_OFFSET, (5, 5, 2))
    points: list[np.ndarray] = []
    anchors: dict[tuple[int, int], int] = {}  # grid cell -> point index, so joined strokes share a point

    def anchor(cell: tuple[int, int]) -> int:
        if cell not in anchors:
            anchors[cell] = len(points)
            points.append(np.array([GRID[cell[0]], GRID[cell[1]]]) + offsets[cell])
        return anchors[cell]

    strokes: list[np.ndarray] = []
    for _ in range(2 + _index(rng, 3)):  # 2-4 strokes
        used = list(anchors)
        if used and rng.random() < JOIN_PROB:
            cell = used[_index(rng, len(used))]
        else:
            cell = (_index(rng, 5), _index(rng, 5))
        segments = []
        for _ in range(1 + _index(rng, 2)):  # 1-2 segments
            start = anchor(cell)
            while True:  # a different grid point, not too far: strokes, not wall-to-wall lines
                nxt = (_index(rng, 5), _index(rng, 5))
                if nxt != cell and abs(nxt[0] - cell[0]) + abs(nxt[1] - cell[1]) <= 4:
                    break
            end = anchor(nxt)
            a, b = points[start], points[end]
            chord = b - a
            bend = 0.0 if rng.random() < STRAIGHT_PROB else (2.0 * rng.random() - 1.0) * CURVE_BEND
            control = (a + b) / 2 + bend * np.array([-chord[1], chord[0]])
            points.append(control)
            segments.append((start, len(points) - 1, end))
            cell = nxt
        strokes.append(np.array(segments, dtype=np.int64))
    return np.stack(points), strokes


def glyph_prototype(split: str, index: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """The undistorted character of class ``index``: control points ``[M, 2]`` in glyph units and the
    stroke segments indexing them (see :func:`make_glyphs`)."""
    return _prototype(class_rng(split, index, seed))


def _distort(u: np.ndarray, points: np.ndarray, hi_res: int) -> np.ndarray:
    """Distorted copies of ``points`` in high-resolution pixel coordinates, ``[count, M, 2]``, from uniform
    draws ``u`` ``[count, 2M + 6]`` (one row per instance).

    Only +, -, *, / are used (the rotation comes from tan(angle/2), not sin/cos): these are correctly rounded
    in IEEE arithmetic, so the coordinates are identical on every machine; the pixels then depend only on
    PIL's integer rasteriser (the same output was seen from Pillow 12.3 / numpy 2.5 and Pillow 13.0 / numpy 2.4).
    """
    count, m = len(u), len(points)
    jittered = points[None] + INSTANCE_JITTER * (2 * u[:, : 2 * m].reshape(count, m, 2) - 1)
    u = u[:, 2 * m:]
    t = MAX_ROTATION * (2 * u[:, 0] - 1)
    cos, sin = (1 - t * t) / (1 + t * t), 2 * t / (1 + t * t)
    low, high = SCALE_RANGE
    scale = low + (high - low) * u[:, 1:3]  # anisotropic
    shear = MAX_SHEAR * (2 * u[:, 3] - 1)
    shift = MAX_SHIFT * (2 * u[:, 4:6] - 1)
    x, y = jittered[..., 0] * scale[:, :1], jittered[..., 1] * scale[:, 1:]
    x = x + shear[:, None] * y
    x, y = cos[:, None] * x - sin[:, None] * y, sin[:, None] * x + cos[:, None] * y
    half, radius = hi_res / 2, GLYPH_EXTENT * hi_res
    return np.stack([half + radius * (x + shift[:, :1]), half + radius * (y + shift[:, 1:])], axis=-1)


def _gutter(hi_res: int) -> int:
    """Rows above and below an instance's tile that no stroke can reach, a multiple of ``SUPERSAMPLE``.

    A bound, not a measurement, so a tile never bleeds into its neighbour: per axis, a grid point lies within
    1 + PROTOTYPE_OFFSET of the centre; a quadratic Bezier strays at most half its control point's offset,
    CURVE_BEND x the chord (<= 2 + 2 PROTOTYPE_OFFSET per axis), from its chord; jitter adds INSTANCE_JITTER.
    Scaling, shear and rotation then stretch the point by at most scale * |(1 + shear, 1)|.
    """
    axis = 1 + PROTOTYPE_OFFSET + CURVE_BEND * (1 + PROTOTYPE_OFFSET) + INSTANCE_JITTER
    radius = SCALE_RANGE[1] * axis * math.sqrt((1 + MAX_SHEAR) ** 2 + 1) + MAX_SHIFT
    pen = (PEN_RANGE[1] + PEN_STROKE_VARIATION) * SUPERSAMPLE / 2 + 1
    reach = radius * GLYPH_EXTENT * hi_res + pen - hi_res / 2
    return max(0, int(np.ceil(reach / SUPERSAMPLE))) * SUPERSAMPLE


def _render(points: np.ndarray, strokes: list[np.ndarray], pens: np.ndarray, size: int) -> np.ndarray:
    """Draw each instance's strokes (white on black at ``SUPERSAMPLE``x) and box-downsample to ``size``;
    returns ink coverage uint8 ``[count, size, size]`` (0 = paper)."""
    count = points.shape[0]
    hi_res = size * SUPERSAMPLE
    t = np.linspace(0.0, 1.0, CURVE_SAMPLES)[:, None]  # [T, 1]
    w0, w1, w2 = (1 - t) ** 2, 2 * (1 - t) * t, t * t
    # All instances share one canvas, stacked vertically with a gutter so strokes leaving their tile are
    # clipped rather than drawn into the neighbour's: one PIL image per class instead of one per instance.
    gutter = _gutter(hi_res)
    tile = hi_res + 2 * gutter
    origin = np.stack([np.zeros(count, np.int64), gutter + tile * np.arange(count)], axis=-1)[:, None]
    curves = []  # per stroke, integer canvas polylines [count, S * (T - 1) + 1, 2]
    for segs in strokes:
        a, c, b = points[:, segs[:, 0]], points[:, segs[:, 1]], points[:, segs[:, 2]]  # [count, S, 2]
        curve = w0 * a[:, :, None] + w1 * c[:, :, None] + w2 * b[:, :, None]  # [count, S, T, 2]
        curve = np.concatenate([curve[:, :, :-1].reshape(count, -1, 2), curve[:, -1:, -1]], axis=1)
        curves.append((np.rint(curve).astype(np.int64) + origin).tolist())
    image = Image.new("L", (hi_res, tile * count), 0)
    draw = ImageDraw.Draw(image)
    for i in range(count):
        for s, curve in enumerate(curves):
            width = int(pens[i, s])
            xy = curve[i]
            # Plain wide polylines (PIL's joint="curve" uses libm trigonometry in Python, not reproducible
            # bit for bit across platforms); round pen dabs at the segment ends cover the corners instead.
            draw.line([tuple(p) for p in xy], fill=255, width=width)
            r = width // 2
            for px, py in xy[:: CURVE_SAMPLES - 1]:
                draw.ellipse((px - r, py - r, px - r + width - 1, py - r + width - 1), fill=255)
    # Box filter in integer arithmetic (PIL's reduce rounds (sum + 8) // 16): no float in the pixel path.
    small = np.asarray(image.reduce(SUPERSAMPLE)).reshape(count, tile // SUPERSAMPLE, size)
    return small[:, gutter // SUPERSAMPLE: gutter // SUPERSAMPLE + size]


def render_class(split: str, index: int, seed: int = 0, count: int = 20, image_size: int = 28) -> np.ndarray:
    """The first ``count`` instances of class ``index`` as uint8 ``[count, 1, image_size, image_size]``,
    white background (255) and dark strokes. Instance ``k`` does not depend on ``count``."""
    if count < 1 or image_size < 8:
        raise DatasetError(f"synthetic-glyphs/{split}: need count >= 1 and image_size >= 8, got {count}, {image_size}")
    rng = class_rng(split, index, seed)
    points, strokes = _prototype(rng)
    # One row of uniform draws per instance, taken in order: the first k rows do not depend on ``count``.
    u = rng.random((count, 2 * len(points) + 6 + 1 + len(strokes)))
    coords = _distort(u[:, : 2 * len(points) + 6], points, image_size * SUPERSAMPLE)
    low, high = PEN_RANGE
    pen = low + (high - low) * u[:, -len(strokes) - 1: -len(strokes)]
    pen = pen + PEN_STROKE_VARIATION * (2 * u[:, -len(strokes):] - 1)
    pens = np.maximum(1, np.rint(pen * SUPERSAMPLE)).astype(np.int64)
    return (255 - _render(coords, strokes, pens, image_size))[:, None]


def _validate(split: str, seed: int, num_classes: int | None, images_per_class: int, image_size: int) -> int:
    class_rng(split, 0, seed)  # checks split and seed
    n = DEFAULT_NUM_CLASSES[split] if num_classes is None else num_classes
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise DatasetError(f"synthetic-glyphs/{split}: num_classes must be a positive integer, got {num_classes!r}")
    if images_per_class < 1:
        raise DatasetError(f"synthetic-glyphs/{split}: images_per_class must be >= 1, got {images_per_class}")
    if image_size < 8:
        raise DatasetError(f"synthetic-glyphs/{split}: image_size must be >= 8, got {image_size}")
    return int(n)


def make_glyphs(split: str, seed: int = 0, num_classes: int | None = None, images_per_class: int = 20,
                image_size: int = 28, cache_dir: str | os.PathLike[str] | None = None) -> ImageSplit:
    """Generate one split of synthetic glyphs.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; their classes never overlap.
        seed: non-negative integer naming the whole dataset (``name`` is ``"synthetic-glyphs/s{seed}/{split}"``).
        num_classes: classes to generate (default 1000 / 100 / 200); class ``k`` is the same for any count.
        images_per_class: instances per class (default 20, as in Omniglot).
        image_size: side of the square images (default 28).
        cache_dir: if given, keep the generated images in a prepared cache there (memory-mapped on reuse);
            by default nothing is written and the split is generated in memory (~3 s for 1000 x 20 on one core).

    Raises:
        DatasetError: unknown split, negative seed, or a non-positive count or size.
    """
    n = _validate(split, seed, num_classes, images_per_class, image_size)

    def build() -> Prepared:
        images = np.concatenate([render_class(split, k, seed, images_per_class, image_size) for k in range(n)])
        return Prepared(images, {})

    if cache_dir is None:
        images = build().images
    else:
        params = {"generator": GENERATOR_VERSION, "seed": int(seed), "split": split, "num_classes": n,
                  "images_per_class": images_per_class, "image_size": image_size}
        images = load_or_prepare("synthetic-glyphs", [], params, build, resolve_cache_dir(Path(cache_dir))).images
    class_names = tuple(f"glyph-{split}-{k}" for k in range(n))
    image_ids = tuple(f"{name}/{i}" for name in class_names for i in range(images_per_class))
    offsets = np.arange(n + 1, dtype=np.int64) * images_per_class
    return ImageSplit(f"synthetic-glyphs/s{seed}/{split}", torch.from_numpy(images), offsets, class_names,
                      image_ids)
