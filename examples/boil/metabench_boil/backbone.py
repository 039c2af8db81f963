"""A three-block convolutional network, registered as ``conv3``: a smaller Conv4 for small images.

Written to metabench's backbone contract (metabench.models.backbones.Backbone): an nn.Module without buffers
(batch norm from metabench.models.norm, batch statistics), a classifier submodule ``head`` and the optional
``embed``. It offers no ``batched_forward``, so the inner loop maps it over tasks with its other engines.
"""

from __future__ import annotations

import torch
from torch import nn

from metabench.models.norm import BatchNorm2d


class Conv3(nn.Module):
    """Three blocks of [3x3 conv stride 2, batch norm, ReLU], global average pooling, a linear head."""

    def __init__(self, in_channels: int, ways: int, image_size: int, hidden: int = 32) -> None:
        super().__init__()
        if min(in_channels, ways, image_size, hidden) < 1:
            raise ValueError(f"conv3 needs positive sizes, got in_channels={in_channels}, ways={ways}, "
                             f"image_size={image_size}, hidden={hidden}")
        blocks = []
        for i in range(3):
            blocks += [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, stride=2, padding=1),
                       BatchNorm2d(hidden), nn.ReLU()]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(hidden, ways)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def conv3(in_channels: int, ways: int, image_size: int, hidden: int = 32) -> Conv3:
    """The builder metabench calls: ``(in_channels, ways, image_size, **model.options)``."""
    return Conv3(in_channels, ways, image_size, hidden=hidden)
