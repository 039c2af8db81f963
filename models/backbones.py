"""Backbones: the written contract (:class:`Backbone`), MAML's Conv4 and non-convolutional MLP, and the registry
of every backbone by name (ResNet-12 and the segmentation network live in their own modules).

Every backbone here is stateless apart from its parameters (no buffers), so that the inner loop can run it
through ``torch.func.functional_call`` and ``torch.func.vmap`` with exact higher-order gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from metabench.core.registry import Registry, RegistryError
from metabench.models.grouped_conv import grouped_conv2d
from metabench.models.norm import BatchNorm1d, BatchNorm2d, is_norm, make_norm_per_step
from metabench.models.resnet12 import resnet12
from metabench.models.segmentation import conv_seg

__all__ = ["BACKBONES", "Backbone", "BatchNorm1d", "BatchNorm2d", "Conv4", "MLP", "build_backbone", "check_backbone",
           "is_norm", "make_norm_per_step"]


@runtime_checkable
class Backbone(Protocol):
    """What the learners need from a network (checked by :func:`check_backbone` when it is built).

    Required:

    - an ``nn.Module`` whose ``forward(x [B, C, H, W])`` gives the logits (``[B, ways]``, or ``[B, ways + 1, H, W]``
      for segmentation);
    - no buffers: the inner loop runs it through ``torch.func.functional_call`` with the adapted parameters, and
      a buffer (running statistics) would be state outside them. Batch norm: :class:`BatchNorm2d` of
      ``metabench.models.norm`` (batch statistics, exact to second order under ``vmap``);
    - a classifier head as the submodule ``head`` (parameters ``head.*``): ANIL adapts it alone, BOIL freezes it.

    Optional (found by the learners that use them, ``None`` / absent otherwise):

    - ``embed(x) -> [B, D]``: the features the head classifies (ProtoNet, Baseline, Baseline++);
    - ``batched_forward(params, x [T, n, ...]) -> [T, n, ...]``: every task's forward at once with its own
      parameters ``[T, *shape]`` (the inner loop's "batched" engine; without it the engine is not a candidate);
    - ``fused_batched_forward(params, x)``: the same, with derivatives the backbone computes its own faster way
      (Conv4: :mod:`metabench.models.grouped_conv`) for the "batched-fused" engine; without it that engine runs
      ``batched_forward`` and is not a candidate of ``engine: auto``;
    - ``ways``: the number of foreground classes the network was built for (segmentation).
    """

    head: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


def check_backbone(name: str, model: object) -> nn.Module:
    """``model`` if it honours :class:`Backbone`'s required part; ``ValueError`` naming what is missing."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"backbone {name!r} built {type(model).__name__}, not an nn.Module")
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise ValueError(f"backbone {name!r} ({type(model).__name__}) has buffers {', '.join(buffers[:3])}: the inner "
                         "loop adapts parameters only (use metabench.models.norm.BatchNorm2d, batch statistics)")
    if not isinstance(getattr(model, "head", None), nn.Module):
        raise ValueError(f"backbone {name!r} ({type(model).__name__}) has no classifier submodule `head`")
    return model


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # negative slope 0.01, as F.leaky_relu's default (MAML++'s code)
}


def _conv_block(in_channels: int, out_channels: int, pool: bool, norm_eps: float = 1e-5,
                norm_scale: bool = True, activation: str = "relu") -> nn.Sequential:
    """[3x3 conv, BatchNorm2d, activation] (+ 2x2 max-pool); without pooling the conv has stride 2 instead."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1 if pool else 2, padding=1)
    layers: list[nn.Module] = [conv, BatchNorm2d(out_channels, eps=norm_eps, scale=norm_scale),
                               ACTIVATIONS[activation]()]
    if pool:
        layers.append(nn.MaxPool2d(2))  # floor division of the size, like TF's 'VALID' pooling in MAML's code
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """The 4-block convolutional network of MAML (Finn et al. 2017, Sec. 5.2, after Vinyals et al. 2016).

    Four blocks of [3x3 conv (padding 1), :class:`BatchNorm2d`, ReLU], then flatten and a linear head with
    ``ways`` outputs. ``pool=False`` (Omniglot, 64 filters): stride-2 convolutions, 28 -> 14 -> 7 -> 4 -> 2.
    ``pool=True`` (mini-ImageNet, 32 filters): stride-1 convolutions, each block followed by a 2x2 max-pool,
    84 -> 42 -> 21 -> 10 -> 5. The head's input size comes from a dry run on a zero image.
    ``global_pool=True`` averages the final map over space instead of flattening it: MAML's reference code
    does this for Omniglot (64 features, ``tf.reduce_mean(hidden4, [1, 2])``), Reptile's flattens (256).

    Init (MAML's reference code): Xavier-uniform conv weights and zero conv biases; the linear head is
    Xavier-uniform with zero bias by default. ``head_init_std=s`` draws the head's weight from N(0, s^2) instead:
    MAML's Omniglot code has ``tf.random_normal([dim_hidden, dim_output])`` (s = 1; its mini-ImageNet head is
    Xavier). Batch-norm affine starts at weight 1, bias 0. ``activation``: "relu" (default) or "leaky_relu"
    (MAML++'s code).

    Input: float ``[B, in_channels, image_size, image_size]``, already scaled (e.g. uint8 / 255 by the caller).
    """

    def __init__(self, in_channels: int, ways: int, image_size: int, hidden: int = 64, pool: bool = False,
                 global_pool: bool = False, norm_eps: float = 1e-5, norm_scale: bool = True,
                 head_init_std: float | None = None, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"Conv4: unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        if min(in_channels, ways, image_size, hidden) < 1:
            raise ValueError(f"Conv4 needs positive sizes, got in_channels={in_channels}, ways={ways}, "
                             f"image_size={image_size}, hidden={hidden}")
        if head_init_std is not None and not head_init_std > 0:
            raise ValueError(f"Conv4: head_init_std must be positive (or null for Xavier), got {head_init_std}")
        self.features = nn.Sequential(
            *(_conv_block(in_channels if i == 0 else hidden, hidden, pool, norm_eps, norm_scale, activation)
              for i in range(4)),
            *([nn.AdaptiveAvgPool2d(1)] if global_pool else []),
            nn.Flatten(),
        )
        self.feature_size = self._dry_feature_size(in_channels, image_size)
        self.head = nn.Linear(self.feature_size, ways)
        self._init_weights(head_init_std)

    def _dry_feature_size(self, in_channels: int, image_size: int) -> int:
        """Flattened feature size for one image, from a dry forward pass (2 images: batch norm needs a batch)."""
        with torch.no_grad():
            dummy = torch.zeros(2, in_channels, image_size, image_size)
            try:
                return int(self.features(dummy).shape[1])
            except RuntimeError as error:  # e.g. pooling a 1x1 map
                raise ValueError(f"Conv4: image_size={image_size} is too small for 4 blocks") from error

    def _init_weights(self, head_init_std: float | None) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if head_init_std is not None:
            nn.init.normal_(self.head.weight, std=head_init_std)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features the head classifies, ``[B, feature_size]`` (ProtoNet's embedding, Baseline's features)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def batched_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``forward`` for ``T`` tasks at once, each with its own parameters (the inner loop's "batched" engine).

        ``params``: this module's parameter names -> ``[T, *shape]``; ``x``: ``[T, n, C, H, W]`` -> ``[T, n, ways]``.
        Tasks are stacked along channels (``[n, T*C, H, W]``) so each conv is ONE grouped convolution with
        ``groups=T`` and batch norm over dims (0, 2, 3) is exactly per-task batch norm; the head is one ``baddbmm``.
        """
        return self._batched(params, x, F.conv2d)

    def fused_batched_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """:meth:`batched_forward` with every grouped convolution's derivatives as native whole-group kernels
        (``models/grouped_conv.py``; the "batched-fused" engine): the same values, first-order gradients bit for
        bit, second-order ones to rounding."""
        return self._batched(params, x, grouped_conv2d)

    def _batched(self, params: dict[str, torch.Tensor], x: torch.Tensor, conv: Callable[..., torch.Tensor]
                 ) -> torch.Tensor:
        tasks, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])
        for i, block in enumerate(self.features):
            if isinstance(block, nn.Sequential):
                for j, layer in enumerate(block):
                    h = _batched_layer(layer, f"features.{i}.{j}", params, h, tasks, conv)
            else:
                h = _batched_layer(block, f"features.{i}", params, h, tasks, conv)
        # h is [n, T, F] after Flatten
        weight, bias = params["head.weight"], params["head.bias"]  # [T, ways, F], [T, ways]
        return torch.baddbmm(bias.unsqueeze(1), h.transpose(0, 1), weight.transpose(1, 2))


def _batched_layer(layer: nn.Module, name: str, params: dict[str, torch.Tensor], h: torch.Tensor,
                   tasks: int, conv: Callable[..., torch.Tensor]) -> torch.Tensor:
    """One feature layer of :meth:`Conv4.batched_forward` on task-stacked channels ``[n, T*C, H, W]``; ``conv``:
    ``F.conv2d`` or :func:`grouped_conv2d` (same signature)."""
    if isinstance(layer, nn.Conv2d):
        weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
        return conv(h, weight.reshape(-1, *weight.shape[2:]), bias.reshape(-1), layer.stride, layer.padding,
                    layer.dilation, tasks)
    if isinstance(layer, BatchNorm2d):
        return _batched_norm(layer, name, params, h)
    if isinstance(layer, nn.Flatten):  # [n, T*C, a, b] -> [n, T, C*a*b]: each task's slice flattened as forward does
        return h.reshape(h.shape[0], tasks, -1)
    if isinstance(layer, (nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d)):  # parameter-free, per channel
        return layer(h)
    raise TypeError(f"Conv4.batched_forward: no batched rule for layer {name} ({type(layer).__name__})")


def _batched_norm(layer: BatchNorm2d, name: str, params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Per-task batch norm on task-stacked features (``[n, T*C, ...]``): statistics over every dim but 1.

    Native batch norm with batch statistics: exact to second order outside vmap (checked in float64 by
    tests/test_engines.py) and fused: faster per meta-step on CPU than the plain-op formula (docs/performance.md).
    """
    bias = params[f"{name}.bias"].reshape(-1)
    weight = params.get(f"{name}.weight")
    # Without a scale, a constant 1: torch 2.14's double backward of F.batch_norm fails with weight=None.
    weight = torch.ones_like(bias) if weight is None else weight.reshape(-1)
    return F.batch_norm(h, None, None, weight, bias, training=True, momentum=0.0, eps=layer.eps)


def conv4(in_channels: int, ways: int, image_size: int, hidden: int = 64, pool: bool = False,
          global_pool: bool = False, **norm: Any) -> Conv4:
    """Generic Conv4 (any filter count / pooling); ``norm``: ``norm_eps``, ``norm_scale``, ``head_init_std``,
    ``activation``."""
    return Conv4(in_channels, ways, image_size, hidden=hidden, pool=pool, global_pool=global_pool, **norm)


def conv4_omniglot(in_channels: int, ways: int, image_size: int, hidden: int = 64, global_pool: bool = False,
                   **norm: Any) -> Conv4:
    """MAML's Omniglot Conv4: 64 filters, stride-2 convolutions, no pooling."""
    return Conv4(in_channels, ways, image_size, hidden=hidden, pool=False, global_pool=global_pool, **norm)


def conv4_miniimagenet(in_channels: int, ways: int, image_size: int, hidden: int = 32, **norm: Any) -> Conv4:
    """MAML's mini-ImageNet Conv4: 32 filters, stride-1 convolutions, 2x2 max-pool after each block."""
    return Conv4(in_channels, ways, image_size, hidden=hidden, pool=True, **norm)


class MLP(nn.Module):
    """MAML's non-convolutional network (Finn et al. 2017, Sec. 5.2 / App. A.1), after its reference code
    (github.com/cbfinn/maml ``maml.py``, ``construct_fc_weights`` / ``forward_fc``).

    The image is flattened (28x28 -> 784 for Omniglot); each hidden layer is ``linear -> batch norm -> ReLU``
    (``utils.normalize`` wraps ``tf.contrib.layers.batch_norm(..., activation_fn=relu)``), widths
    ``hidden`` (the paper's 256, 128, 64, 64), then a linear output layer of ``ways`` logits.
    Init (``construct_fc_weights``): every weight ``tf.truncated_normal(stddev=0.01)`` (re-drawn beyond two
    standard deviations), every bias zero. Batch norm: :class:`BatchNorm1d`, by default with TF's
    ``batch_norm`` defaults (offset only, no scale; epsilon 1e-3).

    Parameter names: ``layers.<i>.linear.{weight,bias}``, ``layers.<i>.norm.{bias[,weight]}``,
    ``head.{weight,bias}``. Input: float ``[B, C, H, W]`` (or ``[B, features]``).
    """

    def __init__(self, in_channels: int, ways: int, image_size: int,
                 hidden: Sequence[int] = (256, 128, 64, 64), norm_eps: float = 1e-3, norm_scale: bool = False,
                 init_std: float = 0.01) -> None:
        super().__init__()
        widths = [int(w) for w in hidden]
        if min([in_channels, ways, image_size, *widths], default=0) < 1 or not widths or init_std <= 0:
            raise ValueError(f"MLP needs positive sizes and init_std, got in_channels={in_channels}, ways={ways}, "
                             f"image_size={image_size}, hidden={list(hidden)}, init_std={init_std}")
        self.in_features = in_channels * image_size * image_size
        sizes = [self.in_features, *widths]
        self.layers = nn.ModuleList(
            nn.ModuleDict({"linear": nn.Linear(a, b), "norm": BatchNorm1d(b, eps=norm_eps, scale=norm_scale)})
            for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(widths[-1], ways)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
                nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's activations, ``[B, hidden[-1]]`` (what the head classifies)."""
        h = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            h = torch.relu(layer["norm"](layer["linear"](h)))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def batched_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``forward`` for ``T`` tasks at once: ``params`` name -> ``[T, *shape]``, ``x [T, n, ...]`` ->
        ``[T, n, ways]``. Each linear layer is one ``baddbmm`` over the task dim; batch norm runs per task on
        the task-stacked features ``[n, T*F]``."""
        tasks, n = x.shape[:2]
        h = x.reshape(tasks, n, -1)
        for i, layer in enumerate(self.layers):
            name = f"layers.{i}"
            h = _batched_linear(params[f"{name}.linear.weight"], params[f"{name}.linear.bias"], h)
            stacked = _batched_norm(layer["norm"], f"{name}.norm", params, h.transpose(0, 1).reshape(n, -1))
            h = torch.relu(stacked.reshape(n, tasks, -1).transpose(0, 1))
        return _batched_linear(params["head.weight"], params["head.bias"], h)


def _batched_linear(weight: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-task linear layer: ``weight [T, out, in]``, ``bias [T, out]``, ``h [T, n, in]`` -> ``[T, n, out]``.

    Computed as ``(W h^T)^T`` so that the gradient w.r.t. ``weight`` comes out contiguous in ``[T, out, in]``:
    with ``h W^T`` it is a transposed view, and summing that over the task dim (the backward of the shared
    parameters' expansion) is many times slower on CPU (docs/performance.md, "MAML without convolutions").
    """
    return torch.baddbmm(bias.unsqueeze(2), weight, h.transpose(1, 2)).transpose(1, 2)


def mlp_omniglot(in_channels: int, ways: int, image_size: int, **options: Any) -> MLP:
    """MAML's non-convolutional Omniglot network: 784 -> 256 -> 128 -> 64 -> 64 -> ways (see :class:`MLP`)."""
    return MLP(in_channels, ways, image_size, **options)


def _check_builder(name: str, obj: Any) -> Callable[..., nn.Module]:
    if not callable(obj):
        raise RegistryError(f"backbone {name!r} resolves to {obj!r}, not a builder "
                            "(in_channels, ways, image_size, **options) -> nn.Module")
    return obj


# name -> builder(in_channels, ways, image_size, **options); other packages add theirs through the entry-point
# group "metabench.backbones" or a "package.module:builder" name (metabench.core.registry).
BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone", "metabench.backbones", _check_builder)
BACKBONES.register("conv4", conv4)
BACKBONES.register("conv4-omniglot", conv4_omniglot)
BACKBONES.register("conv4-miniimagenet", conv4_miniimagenet)
BACKBONES.register("mlp-omniglot", mlp_omniglot)
BACKBONES.register("resnet12", resnet12)  # MetaOptNet's / TADAM's ResNet-12 (models/resnet12.py)
BACKBONES.register("conv4-seg", conv_seg)  # few-shot segmentation: ways + 1 logits per pixel (models/segmentation.py)


def build_backbone(name: str, in_channels: int, ways: int, image_size: int, **kwargs: object) -> nn.Module:
    """Build backbone ``name`` (registered, an entry point, or ``package.module:builder``); ``kwargs`` go to its
    builder (e.g. ``hidden=8``); the result is checked against :class:`Backbone`."""
    return check_backbone(name, BACKBONES.get(name)(in_channels, ways, image_size, **kwargs))
