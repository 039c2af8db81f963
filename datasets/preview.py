"""Draw an episode as a PNG grid so a person can see what a benchmark feeds the model."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from metabench.datasets.base import MASK_IGNORE
from metabench.datasets.episodes import EpisodeIndices, EpisodeSampler


def episode_grid(sampler: EpisodeSampler, indices: EpisodeIndices, episode: int = 0) -> torch.Tensor:
    """A ``[3, H, W]`` float image: one row per label, its support images, a blank gap, its query images.

    For a segmentation split each image shows its mask: foreground tinted red, ignored pixels grey.
    """
    spec = sampler.spec
    images = sampler.split.images
    masks = sampler.split.masks
    blank = torch.full_like(images[0], 255)
    tiles, rows = [], []
    for label in range(spec.ways):
        support = indices.support[episode, label * spec.shots:(label + 1) * spec.shots]
        query = indices.query[episode, label * spec.queries:(label + 1) * spec.queries]
        tiles += [images[i] for i in support] + [blank] + [images[i] for i in query]
        rows += [int(i) for i in support] + [-1] + [int(i) for i in query]
    batch = torch.stack(tiles).float() / 255.0
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    if masks is not None:
        batch = batch.clone()
        red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
        for tile, row in enumerate(rows):
            if row < 0:
                continue
            mask = masks[row]
            batch[tile] = torch.where(mask == 1, 0.5 * batch[tile] + 0.5 * red, batch[tile])
            batch[tile] = torch.where(mask == MASK_IGNORE, torch.full_like(batch[tile], 0.5), batch[tile])
    return make_grid(batch, nrow=spec.shots + 1 + spec.queries, padding=2, pad_value=0.5)


def save_episode_grid(sampler: EpisodeSampler, indices: EpisodeIndices, out: Path, episode: int = 0) -> Path:
    """Write :func:`episode_grid` to ``out`` (PNG); returns the path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(episode_grid(sampler, indices, episode), out)
    return out
