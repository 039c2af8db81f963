"""A small encoder-decoder for few-shot segmentation that runs under the functional inner loop.

``ConvSeg`` is a Conv4-style encoder (four [3x3 conv, BatchNorm2d, ReLU] blocks, 2x2 max-pool between them)
with a light U-Net decoder: at each of the three coarser levels the map is upsampled (bilinear) to the size
of the next finer encoder map, concatenated with it (skip connection) and mixed by one [3x3 conv, BatchNorm2d,
ReLU] block; a 1x1 convolution gives ``ways + 1`` logits per pixel (background, then one channel per
episode label) at the input resolution.

Like every metabench backbone it is buffer-free (``metabench.models.backbones.BatchNorm2d`` normalises with
the current batch's statistics), so ``torch.func.functional_call`` / ``vmap`` and second-order MAML are exact.
Parameter names start with ``encoder.``, ``decoder.`` or ``head.``, which is what ``algorithm.adapt``
(e.g. ``[decoder, head]``) selects for inner-loop adaptation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metabench.datasets.registry import SEGMENTATION
from metabench.models.norm import BatchNorm2d

DEPTH = 4  # encoder blocks; the decoder has DEPTH - 1 (one per skip connection)


class ConvBlock(nn.Module):
    """[3x3 conv (padding 1), BatchNorm2d, ReLU]: keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class ConvSeg(nn.Module):
    """Conv4 encoder + U-Net-style decoder with skip connections; ``[B, C, H, W] -> [B, ways + 1, H, W]`` logits.

    Args:
        in_channels: image channels (3 for RGB).
        ways: foreground labels per episode (1 for the usual 1-way few-shot segmentation); the network
            outputs ``ways + 1`` channels, channel 0 being background.
        image_size: input side; only checked (the network is fully convolutional, any size >= 8 works).
        hidden: filters of every block (Conv4 keeps the width constant; 32 is MAML's mini-ImageNet width).

    Sizes that are not multiples of 8 work: pooling floors and the decoder upsamples to each skip's exact size.
    Init: Xavier-uniform convolutions with zero bias (as ``Conv4``), batch-norm weight 1 and bias 0.
    """

    task = SEGMENTATION  # the runner checks that a segmentation benchmark got a dense network

    def __init__(self, in_channels: int, ways: int, image_size: int, hidden: int = 32) -> None:
        super().__init__()
        if min(in_channels, ways, hidden) < 1:
            raise ValueError(f"ConvSeg needs positive sizes, got in_channels={in_channels}, ways={ways}, "
                             f"hidden={hidden}")
        if image_size < 2 ** (DEPTH - 1):
            raise ValueError(f"ConvSeg: image_size={image_size} is too small for {DEPTH} levels "
                             f"(needs >= {2 ** (DEPTH - 1)})")
        self.ways = ways
        self.encoder = nn.ModuleList(ConvBlock(in_channels if i == 0 else hidden, hidden) for i in range(DEPTH))
        self.decoder = nn.ModuleList(ConvBlock(2 * hidden, hidden) for _ in range(DEPTH - 1))
        self.head = nn.Conv2d(hidden, ways + 1, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            # Bilinear upsampling to the skip's exact size (odd sizes were floored by the pooling).
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def conv_seg(in_channels: int, ways: int, image_size: int, hidden: int = 32) -> ConvSeg:
    """Builder for the backbone registry (``model.backbone: conv4-seg``)."""
    return ConvSeg(in_channels, ways, image_size, hidden=hidden)
