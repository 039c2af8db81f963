"""Synthetic segmentation: textured objects on textured backgrounds, generated from a seed, needing no download.

Each class is an object kind: a closed shape whose radius follows the class's own harmonic profile
``r(phi) = 1 + sum_k a_k cos(k phi + p_k)`` with a class aspect ratio, painted with the class's texture rule
(stripes, checks, dots or a gradient between two class colours, in the object's own frame so it turns with the
object). An instance places that object at a random position, rotation and scale (radius 16-30% of the side),
with slightly jittered colours, on a background of random colour gratings and pixel noise, usually with one
distractor object of random shape and texture underneath. The mask marks the class object: 1 inside, 0 outside.

Every class is generated from its own random stream keyed by (seed, split, class index), so splits never share
a class and a class never depends on how many classes are generated; instance ``k`` does not depend on how many
instances are drawn. Draws use only ``Generator.random()`` (stable bits across numpy versions); shapes use
numpy's sin / cos / arctan2, so a boundary pixel could differ between platforms whose libm differs in the last
bit. Images are rendered at 2x and box-downsampled; a pixel is foreground when >= half of it is covered.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from metabench.datasets.base import DatasetError, ImageSplit, resolve_cache_dir
from metabench.datasets.cache import Prepared, load_or_prepare

DATASET = "synthetic-seg"
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}  # part of every class's seed: never renumber
DEFAULT_NUM_CLASSES = {"train": 100, "val": 30, "test": 50}
DEFAULT_IMAGE_SIZE = 64
GENERATOR_VERSION = 1  # bump whenever the drawing below changes: it keys caches and names the data
_STREAM_TAG = 0x73656731  # "seg1": keeps these streams apart from other uses of the same seed

SUPERSAMPLE = 2
HARMONICS = 5  # k = 2 .. 6
RADIUS_RANGE = (0.16, 0.30)  # object radius as a fraction of the image side
TEXTURES = ("stripes", "checks", "dots", "gradient")
COLOUR_JITTER = 18.0  # per-instance colour change (+-, per channel)
NOISE = 12.0  # background pixel noise (+-)
DISTRACTOR_PROB = 0.8
_CLASS_DRAWS = 2 * HARMONICS + 1 + 2 + 6 + 1 + 2 + 1  # amplitudes, phases, spiky flag, aspect, 2 colours, ...
_INSTANCE_DRAWS = 5 + 6 + 10 + 1 + _CLASS_DRAWS + 5  # pose, jitter, background, distractor flag, its kind, pose


def class_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The random stream of one class, keyed only by (seed, split, class index)."""
    if split not in SPLIT_CODES:
        raise DatasetError(f"{DATASET}: unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"{DATASET}: seed must be a non-negative integer, got {seed!r}")
    if index < 0:
        raise DatasetError(f"{DATASET}: class index must be non-negative, got {index}")
    entropy = [_STREAM_TAG, GENERATOR_VERSION, int(seed), SPLIT_CODES[split], int(index)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _kind(u: np.ndarray) -> dict[str, object]:
    """An object kind (shape profile + texture rule) from ``_CLASS_DRAWS`` uniforms."""
    amps = 0.22 * u[:HARMONICS] / np.arange(1, HARMONICS + 1) ** 0.5
    phases = 2 * math.pi * u[HARMONICS:2 * HARMONICS]
    i = 2 * HARMONICS
    if u[i] < 0.35:  # a spiky class: one dominant harmonic gives a star / cog outline
        k = int(u[i + 1] * HARMONICS)
        amps[k] = 0.3 + 0.15 * u[i + 2]
    aspect = 1.0 + 0.8 * u[i + 2]
    colours = 255.0 * u[i + 3:i + 9].reshape(2, 3)
    if np.abs(colours[0] - colours[1]).sum() < 150:  # keep the two texture colours apart
        colours[1] = 255.0 - colours[0]
    texture = TEXTURES[min(int(u[i + 9] * len(TEXTURES)), len(TEXTURES) - 1)]
    frequency = 1.5 + 2.5 * u[i + 10]  # texture cycles per object radius
    angle = math.pi * u[i + 11]
    return {"amps": amps, "phases": phases, "aspect": aspect, "colours": colours, "texture": texture,
            "frequency": frequency, "angle": angle}


def _paint(kind: dict[str, object], pose: np.ndarray, jitter: np.ndarray, canvas: np.ndarray) -> np.ndarray:
    """Paint one object posed by ``pose`` (5 uniforms) onto ``canvas`` ``[H, W, 3]`` (in place); returns its
    coverage, bool ``[H, W]``. Only the object's bounding box is evaluated."""
    size = canvas.shape[0]
    amps = np.asarray(kind["amps"])
    aspect = float(kind["aspect"])  # type: ignore[arg-type]
    radius = size * (RADIUS_RANGE[0] + (RADIUS_RANGE[1] - RADIUS_RANGE[0]) * pose[0])
    margin = 0.6 * radius  # keep most of the object inside the frame
    cx = margin + (size - 2 * margin) * pose[1]
    cy = margin + (size - 2 * margin) * pose[2]
    turn = 2 * math.pi * pose[3]
    reach = radius * (1.0 + float(np.abs(amps).sum())) * math.sqrt(aspect)  # bounds |(u, v)| * radius
    r0, r1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 2)
    c0, c1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 2)
    coverage = np.zeros((size, size), dtype=bool)
    if r0 >= r1 or c0 >= c1:
        return coverage
    ys, xs = np.mgrid[r0:r1, c0:c1].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    u = (math.cos(turn) * dx + math.sin(turn) * dy) / radius
    v = (-math.sin(turn) * dx + math.cos(turn) * dy) / radius
    ua, va = u / math.sqrt(aspect), v * math.sqrt(aspect)
    rho = np.hypot(ua, va)
    # r(phi) = 1 + Re(sum_k a_k e^{i p_k} e^{i k phi}): powers of the unit complex number instead of k cosines.
    unit = (ua + 1j * va) / np.maximum(rho, 1e-12)
    power = unit * unit  # k = 2
    total = np.zeros_like(unit)
    for a, phase in zip(amps, np.asarray(kind["phases"])):
        total += a * complex(math.cos(phase), math.sin(phase)) * power
        power = power * unit
    inside = rho < 1.0 + total.real
    frequency = float(kind["frequency"]) * (0.9 + 0.2 * pose[4])  # type: ignore[arg-type]
    angle = float(kind["angle"])  # type: ignore[arg-type]
    s = u * math.cos(angle) + v * math.sin(angle)
    t = -u * math.sin(angle) + v * math.cos(angle)
    texture = kind["texture"]
    if texture == "stripes":
        weight = (np.sin(2 * math.pi * frequency * s) > 0).astype(np.float64)
    elif texture == "checks":
        weight = (np.sin(math.pi * frequency * s) * np.sin(math.pi * frequency * t) > 0).astype(np.float64)
    elif texture == "dots":
        fs, ft = frequency * s, frequency * t
        weight = ((fs - np.floor(fs) - 0.5) ** 2 + (ft - np.floor(ft) - 0.5) ** 2 < 0.09).astype(np.float64)
    else:
        weight = np.clip(0.5 + 0.5 * s, 0.0, 1.0)
    colours = np.asarray(kind["colours"]) + COLOUR_JITTER * (2 * jitter.reshape(2, 3) - 1)
    weight = weight[inside][:, None]
    region = canvas[r0:r1, c0:c1]
    region[inside] = weight * colours[0] + (1 - weight) * colours[1]
    coverage[r0:r1, c0:c1] = inside
    return coverage


def render_class(split: str, index: int, seed: int = 0, count: int = 20,
                 image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` instances of class ``index``: images uint8 ``[count, 3, S, S]`` and masks uint8
    ``[count, S, S]`` (0/1). Instance ``k`` does not depend on ``count``."""
    if count < 1 or image_size < 16:
        raise DatasetError(f"{DATASET}/{split}: need count >= 1 and image_size >= 16, got {count}, {image_size}")
    rng = class_rng(split, index, seed)
    kind = _kind(rng.random(_CLASS_DRAWS))
    draws = rng.random((count, _INSTANCE_DRAWS))  # one row per instance, in order
    hi = image_size * SUPERSAMPLE
    grid = np.arange(hi, dtype=np.float64) + 0.5
    images = np.empty((count, 3, image_size, image_size), dtype=np.uint8)
    masks = np.empty((count, image_size, image_size), dtype=np.uint8)
    for n, row in enumerate(draws):
        pose, jitter, back = row[:5], row[5:11], row[11:21]
        base = 255.0 * back[:3]
        grating = 90.0 * (2 * back[3:6] - 1)
        freq, angle, phase = (0.5 + 3.0 * back[6]) / hi, math.pi * back[7], 2 * math.pi * back[8]
        # A separable grating: sin(a x + b y + c) from one row and one column of sines and cosines.
        ax, by = 2 * math.pi * freq * math.cos(angle) * grid, 2 * math.pi * freq * math.sin(angle) * grid + phase
        wave = np.sin(ax)[None, :] * np.cos(by)[:, None] + np.cos(ax)[None, :] * np.sin(by)[:, None]
        canvas = base + wave[..., None] * grating
        if row[21] < DISTRACTOR_PROB:
            _paint(_kind(row[22:22 + _CLASS_DRAWS]), row[22 + _CLASS_DRAWS:], jitter, canvas)
        inside = _paint(kind, pose, jitter, canvas)
        small = canvas.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE, 3).mean(axis=(1, 3))
        coverage = inside.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))
        images[n] = np.clip(np.rint(small), 0, 255).astype(np.uint8).transpose(2, 0, 1)
        masks[n] = coverage >= 0.5
    # Pixel noise from its own stream after all rows, so it never shifts the per-instance rows above.
    noise_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [_STREAM_TAG, GENERATOR_VERSION, int(seed), SPLIT_CODES[split], int(index), 1])))
    for n in range(count):  # instance by instance, so instance k's noise does not depend on count
        noise = NOISE * (2 * noise_rng.random((3, image_size, image_size)) - 1)
        images[n] = np.clip(np.rint(images[n] + noise), 0, 255).astype(np.uint8)
    return images, masks


def make_segmentation(split: str, seed: int = 0, num_classes: int | None = None, images_per_class: int = 20,
                      image_size: int = DEFAULT_IMAGE_SIZE,
                      cache_dir: str | os.PathLike[str] | None = None) -> ImageSplit:
    """Generate one split of the synthetic segmentation set, named ``"synthetic-seg/s<seed>/<split>/<S>px"``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; their classes never overlap.
        seed: non-negative integer naming the whole dataset.
        num_classes: classes to generate (default 100 / 30 / 50); class ``k`` is the same for any count.
        images_per_class: instances per class (default 20).
        image_size: side of the square images (default 64).
        cache_dir: if given, keep the generated split in a prepared cache there; by default it is generated in
            memory (seconds for the default train split on a small CPU; pass cache_dir to generate once).

    Raises:
        DatasetError: unknown split, negative seed, or a non-positive count or too small a size.
    """
    class_rng(split, 0, seed)  # checks split and seed
    n = DEFAULT_NUM_CLASSES[split] if num_classes is None else num_classes
    for label, value, low in (("num_classes", n, 1), ("images_per_class", images_per_class, 1),
                              ("image_size", image_size, 16)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise DatasetError(f"{DATASET}/{split}: {label} must be an integer >= {low}, got {value!r}")

    def build() -> Prepared:
        parts = [render_class(split, k, seed, images_per_class, image_size) for k in range(n)]
        return Prepared(np.concatenate([p[0] for p in parts]), {}, np.concatenate([p[1] for p in parts]))

    if cache_dir is None:
        prepared = build()
    else:
        params = {"generator": GENERATOR_VERSION, "seed": int(seed), "split": split, "num_classes": int(n),
                  "images_per_class": int(images_per_class), "image_size": int(image_size)}
        prepared = load_or_prepare(DATASET, [], params, build, resolve_cache_dir(Path(cache_dir)))
    assert prepared.masks is not None
    class_names = tuple(f"seg-{split}-{k}" for k in range(n))
    image_ids = tuple(f"{name}/{i}" for name in class_names for i in range(images_per_class))
    offsets = np.arange(n + 1, dtype=np.int64) * images_per_class
    return ImageSplit(f"{DATASET}/s{seed}/{split}/{image_size}px", torch.from_numpy(prepared.images), offsets,
                      class_names, image_ids, torch.from_numpy(prepared.masks))
