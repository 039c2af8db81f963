"""ResNet-12, the few-shot backbone of TADAM and MetaOptNet, buffer-free so that every algorithm can use it.

Architecture, with the source of each detail:

- Four residual blocks, each of three 3x3 convolutions with batch norm, a shortcut, and a 2x2 max-pool at the end:
  TADAM (Oreshkin, Rodriguez, Lacoste 2018, arXiv:1805.10123) Sec. 2.3: "We employ ResNet-12 [...] as the backbone
  feature extractor. It has 4 blocks of depth 3 with 3x3 kernels and shortcut connections. 2x2 max-pool is applied
  at the end of each block." MetaOptNet (Lee, Maji, Ravichandran, Soatto 2019, arXiv:1904.03758), code
  github.com/kjunelee/MetaOptNet models/ResNet12_embedding.py, ``BasicBlock``: conv1 -> bn1 -> relu -> conv2 ->
  bn2 -> relu -> conv3 -> bn3, ``out += residual``, relu, ``self.maxpool = nn.MaxPool2d(stride)`` with stride 2.
- Widths: 64-160-320-640 by default (MetaOptNet code: ``self._make_layer(block, 64 | 160 | 320 | 640, stride=2,
  ...)``); the 64-128-256-512 variant with ``widths=(64, 128, 256, 512)`` (TADAM Sec. 2.3: "Convolutional layer
  depth starts with 64 filters and is doubled after every max-pool"). ``hidden=h`` rescales either so that the
  first block has ``h`` filters (tiny networks for tests).
- Convolutions without bias (batch norm follows each): MetaOptNet ``conv3x3(..., bias=False)``.
- Shortcut: a 1x1 convolution (no bias) + batch norm on every block, since every block changes width (MetaOptNet
  ``_make_layer``: ``downsample = nn.Sequential(nn.Conv2d(..., kernel_size=1, stride=1, bias=False),
  nn.BatchNorm2d(...))``; TADAM code model/tadam.py ``build_simple_res_net``: ``slim.conv2d(h, ..., kernel_size=1)``
  under a batch-norm ``arg_scope``).
- Activation: LeakyReLU with slope 0.1 (MetaOptNet ``nn.LeakyReLU(0.1)``) by default; ``activation="swish"`` is
  TADAM's swish-1, x * sigmoid(x) (TADAM App. B: "Each convolutional layer is followed by a batch norm layer and
  the swish-1 activation function").
- Output: the last block's map flattened (MetaOptNet train.py ``resnet12(avg_pool=False, ...)``: 640 x 5 x 5 =
  16,000 features on 84x84 images); ``global_pool=True`` averages it over space instead (TADAM App. B: "4 resnet
  blocks [...] followed by a global average-pool": 640 or 512 features).
- Init: convolutions ``kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu")``, batch norm weight 1 and bias 0
  (MetaOptNet ``ResNet.__init__``). The linear head (``ways`` logits, for the MAML family; ProtoNet and the
  baselines use :meth:`ResNet12.embed`) is metabench's, as in Conv4: Xavier-uniform weight, zero bias, or
  N(0, head_init_std^2).
- Batch norm: :class:`metabench.models.backbones.BatchNorm2d`, batch statistics and no buffers, so
  ``functional_call`` / ``vmap`` and second-order MAML are exact (tests/test_resnet12.py checks a float64
  meta-gradient against a plain sequential autograd loop).

Left out: MetaOptNet's DropBlock (block size 5 on the last two blocks) and dropout (rate 0.1 on the first two), a
stochastic regularizer that would need its own random stream inside the functional inner loop; TADAM's task
conditioning (FiLM layers driven by a task embedding network), a part of TADAM's method, not of the backbone; TADAM's
"SAME" max-pooling on the first three blocks only (``num_max_pools=3``): every block here pools with floor division.

Parameter count (feature extractor, no head): 12,424,320 for 64-160-320-640 and 7,996,800 for 64-128-256-512,
computed from the layer list above (tests/test_resnet12.py); the first is the "12.4M" usually quoted for this
network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metabench.models.norm import BatchNorm2d

METAOPTNET_WIDTHS = (64, 160, 320, 640)
TADAM_WIDTHS = (64, 128, 256, 512)
LEAKY_SLOPE = 0.1  # MetaOptNet: nn.LeakyReLU(0.1)
ACTIVATIONS = ("leaky_relu", "swish")


class ResidualBlock(nn.Module):
    """[3x3 conv, batch norm, activation] x 2, 3x3 conv, batch norm; plus a 1x1 conv + batch norm shortcut; sum,
    activation, 2x2 max-pool (floor)."""

    def __init__(self, in_channels: int, out_channels: int, activation: str, norm_eps: float, norm_scale: bool) -> None:
        super().__init__()
        self.activation = activation
        for i, c_in in enumerate((in_channels, out_channels, out_channels), start=1):
            self.add_module(f"conv{i}", nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False))
            self.add_module(f"norm{i}", BatchNorm2d(out_channels, eps=norm_eps, scale=norm_scale))
        self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.shortcut_norm = BatchNorm2d(out_channels, eps=norm_eps, scale=norm_scale)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, LEAKY_SLOPE) if self.activation == "leaky_relu" else F.silu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        h = self.act(self.norm2(self.conv2(h)))
        h = self.norm3(self.conv3(h))
        h = self.act(h + self.shortcut_norm(self.shortcut_conv(x)))
        return F.max_pool2d(h, 2)


class ResNet12(nn.Module):
    """ResNet-12 (see the module docstring for every detail and its source) with a linear head of ``ways`` logits.

    Parameter names: ``blocks.<i>.conv<j>.weight``, ``blocks.<i>.norm<j>.{weight,bias}``,
    ``blocks.<i>.shortcut_{conv,norm}.*`` (i = 0..3, j = 1..3) and ``head.{weight,bias}`` (ANIL's ``head``).
    Input: float ``[B, in_channels, image_size, image_size]``; 84 -> 42 -> 21 -> 10 -> 5, 28 -> 14 -> 7 -> 3 -> 1.
    """

    def __init__(self, in_channels: int, ways: int, image_size: int, widths: Sequence[int] = METAOPTNET_WIDTHS,
                 hidden: int | None = None, activation: str = "leaky_relu", global_pool: bool = False,
                 norm_eps: float = 1e-5, norm_scale: bool = True, head_init_std: float | None = None) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 4:
            raise ValueError(f"ResNet12 has 4 blocks: widths needs 4 numbers, got {widths}")
        if hidden is not None:  # the same ratios from a first width of `hidden`
            widths = [max(1, round(w * hidden / widths[0])) for w in widths]
        if min(in_channels, ways, image_size, *widths) < 1:
            raise ValueError(f"ResNet12 needs positive sizes, got in_channels={in_channels}, ways={ways}, "
                             f"image_size={image_size}, widths={widths}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ResNet12: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if head_init_std is not None and not head_init_std > 0:
            raise ValueError(f"ResNet12: head_init_std must be positive (or null for Xavier), got {head_init_std}")
        self.widths = tuple(widths)
        self.global_pool = global_pool
        self.blocks = nn.Sequential(*(ResidualBlock(c_in, c_out, activation, norm_eps, norm_scale)
                                      for c_in, c_out in zip([in_channels, *widths[:-1]], widths)))
        self.feature_size = self._dry_feature_size(in_channels, image_size)
        self.head = nn.Linear(self.feature_size, ways)
        self._init_weights(head_init_std)

    def _dry_feature_size(self, in_channels: int, image_size: int) -> int:
        if image_size < 16:  # four floor halvings must leave at least one pixel
            raise ValueError(f"ResNet12: image_size={image_size} is too small for 4 max-pooled blocks (>= 16)")
        with torch.no_grad():
            return int(self.embed(torch.zeros(2, in_channels, image_size, image_size)).shape[1])

    def _init_weights(self, head_init_std: float | None) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
        nn.init.zeros_(self.head.bias)
        if head_init_std is None:
            nn.init.xavier_uniform_(self.head.weight)
        else:
            nn.init.normal_(self.head.weight, std=head_init_std)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features the head classifies, ``[B, feature_size]``."""
        h = self.blocks(x)
        return h.mean(dim=(2, 3)) if self.global_pool else h.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def resnet12(in_channels: int, ways: int, image_size: int, **options: Any) -> ResNet12:
    """ResNet-12 (``model.backbone: resnet12``); ``options``: ``widths``, ``hidden``, ``activation``,
    ``global_pool``, ``norm_eps``, ``norm_scale``, ``head_init_std``."""
    return ResNet12(in_channels, ways, image_size, **options)
