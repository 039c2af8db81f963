"""Honest FLOP counts of a training step, and the machine's matrix-multiply rate to compare them with.

``torch.utils.flop_counter.FlopCounterMode`` counts the weight gradient of a grouped convolution as if the
convolution were dense over all groups (its ``conv_backward_flop`` ignores ``groups``): for the batched engine's
grouped convolutions (``groups`` = meta-batch) that multiplies the count of every weight gradient by the number
of tasks (a MAML Omniglot 5w1s step: 89.6 GFLOP counted for 10.5 done). :func:`flop_counter` replaces that one
formula by one that divides the weight-gradient term by ``groups``; everything else is torch's. With it, the count
depends on the work done, not on how it is batched (``tests/test_flops.py``: grouped and per-task second-order
gradients count the same; the batched and sequential engines' FOMAML steps count the same; a Conv4 forward matches
a hand-derived count). To second order a batched step never counts more than the sequential reference, whose
native double backward also computes (and discards) the gradient w.r.t. the input images.

Convention (torch's): multiply-adds count 2 FLOPs; only convolutions and matrix products are counted (bias
additions, batch norm, activations and the inner SGD update are not); padded positions count as work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

aten = torch.ops.aten


def _transposed(shape: list[int]) -> list[int]:
    return [shape[1], shape[0], *shape[2:]]


def conv_backward_flop(grad_out_shape: list[int], x_shape: list[int], w_shape: list[int], _bias: Any,
                       _stride: Any, _padding: Any, _dilation: Any, transposed: bool, _output_padding: Any,
                       groups: int, output_mask: list[bool], out_shape: list[Any] | None = None,
                       **_kwargs: Any) -> int:
    """FLOPs of ``aten.convolution_backward``: torch's formula, with the weight gradient of a grouped convolution
    counted per group.

    The input gradient is a (transposed) convolution with the layer's own weight, whose shape already holds
    ``in_channels / groups``: torch counts it right. The weight gradient correlates every input channel with the
    output channels of ITS group only, ``1 / groups`` of what torch's formula (input channels x output channels)
    counts.
    """
    assert out_shape is not None  # FlopCounterMode's shape wrapper always passes the outputs' shapes
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, list(out_shape[0]), not transposed)
    if output_mask[1]:
        first, second = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        dense = conv_flop_count(_transposed(first), _transposed(second), _transposed(list(out_shape[1])), False)
        flops += dense // groups
    return flops


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` whose grouped-convolution backward is counted per group (module docstring)."""
    return FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: conv_backward_flop})


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()``: convolutions and matrix products, forward and every backward (:func:`flop_counter`)."""
    counter = flop_counter()
    with counter:
        fn()
    return int(counter.get_total_flops())


def gemm_rate(size: int = 2048, repeats: int = 5, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> float:
    """The machine's matrix-multiply rate in FLOP/s: the median over ``repeats`` timed ``size x size`` products
    (``2 size^3`` FLOPs each) after one untimed, with torch's current thread count.

    What a step's achieved FLOP/s is compared with: the same kernels' best case on this device, measured in the
    same run (the machine's load and thread count are then the step's).
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"gemm_rate needs size >= 1 and repeats >= 1, got size={size}, repeats={repeats}")
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first product warms the allocator and the kernel choice
            seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds)
