"""A grouped 2-d convolution whose derivatives of every order are native whole-group kernels: the convolutions of
the "batched-fused" engine (``models/inner_loop.py``).

Why: autograd's double backward of a grouped convolution (``aten::_convolution_double_backward``) computes one of
its weight gradients group by group -- with a meta-batch of 32 tasks, 32 small convolutions per layer plus slicing,
copies, a 4x4 kernel cropped to 3x3 and a strided result -- the largest item of second-order MAML's outer backward
on the CPU (docs/performance.md, "Where a MAML step's time goes"). Here every derivative is one call of a native
kernel for all groups:

    (gx, gw, gb) = backward(gy; x, w):  d gy = conv(ggx, w) + conv(x, ggw) + ggb,
                                        d x = input_grad(gy, ggw),  d w = weight_grad(gy, ggx)
    gx = input_grad(gy, w):             d gy = conv(ggx, w),        d w = weight_grad(gy, ggx)
    gw = weight_grad(gy, x):            d gy = conv(x, ggw),        d x = input_grad(gy, ggw)

(the maps are bilinear, so these are exact, to any order). First-order gradients, and the values of the inner
gradients, are autograd's own (the same native call), bit for bit: FOMAML, Reptile and ANIL compute exactly what the
"batched" engine computes. The second-order meta-gradient equals autograd's to float rounding only (float64
<= 1e-10: tests/test_grouped_conv.py, tests/test_engines.py), which is why this is an engine of its own: records
made on "batched" regenerate bit for bit there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ConvArgs", "grouped_conv2d"]


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...],
                   padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` with native whole-group derivatives."""
    return _GroupedConv.apply(x, weight, bias, ConvArgs(list(stride), list(padding), list(dilation), groups))


@dataclass(frozen=True)
class ConvArgs:
    """A grouped 2-d convolution's geometry, as ``aten.convolution_backward`` takes it."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int

    def backward(self, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
        """(input, weight, bias) gradients where ``mask`` says, in ONE native call: autograd's own first-order
        backward of ``F.conv2d``, bit for bit."""
        return torch.ops.aten.convolution_backward(grad_out, x, weight, [weight.shape[0]] if mask[2] else None,
                                                   self.stride, self.padding, self.dilation, False, [0, 0],
                                                   self.groups, mask)


class _GroupedConv(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, groups=...)``; its backward is :class:`_ConvGrads` when differentiated again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                conv: ConvArgs) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        if not torch.is_grad_enabled():  # first order: nothing will differentiate these gradients
            return (*ctx.conv.backward(grad_out, x, weight, mask), None)
        grads = iter(_ConvGrads.apply(grad_out, x, weight, ctx.conv, tuple(mask)))
        return (*(next(grads) if needed else None for needed in mask), None)


class _ConvGrads(torch.autograd.Function):
    """The gradients (input, weight, bias; those in ``mask``, in that order) of the convolution for ``grad_out``:
    autograd's values, differentiable through the native kernels (the derivatives in the module docstring). With one
    gradient in ``mask`` it is :func:`_input_grad` or :func:`_weight_grad`, whose own derivatives it also gives."""

    @staticmethod
    def forward(ctx: Any, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conv: ConvArgs,
                mask: tuple[bool, bool, bool]) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(grad_out, x, weight)
        ctx.conv, ctx.mask = conv, mask
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero convolutions
        return tuple(g for g in conv.backward(grad_out, x, weight, list(mask)) if g is not None)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        grad_out, x, weight = ctx.saved_tensors
        given = iter(grads)
        ggx, ggw, ggb = (next(given) if m else None for m in ctx.mask)
        needs = ctx.needs_input_grad
        d_grad_out = None
        if needs[0]:
            terms = ([_GroupedConv.apply(ggx, weight, None, ctx.conv)] if ggx is not None else []) + (
                [_GroupedConv.apply(x, ggw, None, ctx.conv)] if ggw is not None else []) + (
                [ggb.view(1, -1, 1, 1).expand_as(grad_out)] if ggb is not None else [])
            d_grad_out = sum(terms[1:], terms[0]) if terms else None
        d_x = _input_grad(grad_out, x, ggw, ctx.conv) if needs[1] and ggw is not None else None
        d_weight = _weight_grad(grad_out, ggx, weight, ctx.conv) if needs[2] and ggx is not None else None
        return d_grad_out, d_x, d_weight, None, None


def _input_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conv: ConvArgs) -> torch.Tensor:
    """The input gradient of the convolution for ``grad_out`` and ``weight`` (``x`` only lends its shape)."""
    return _ConvGrads.apply(grad_out, x, weight, conv, (True, False, False))[0]


def _weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conv: ConvArgs) -> torch.Tensor:
    """The weight gradient of the convolution for ``grad_out`` and input ``x`` (``weight`` only lends its shape)."""
    return _ConvGrads.apply(grad_out, x, weight, conv, (False, True, False))[0]
