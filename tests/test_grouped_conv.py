"""The "batched-fused" engine's grouped convolution (``grouped_conv.grouped_conv2d``): its derivatives of order 1, 2
and 3 equal those of ``F.conv2d`` in float64 (<= 1e-10), for strided, padded and pooled-network geometries,
whichever inputs require grad; ``gradgradcheck`` against finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metabench.models.grouped_conv import grouped_conv2d
from tests.helpers import rel_err

DT = torch.float64


def _inputs(groups: int, c_in: int, c_out: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, groups * c_in, size, size, generator=gen, dtype=DT)
    w = torch.randn(groups * c_out, c_in, 3, 3, generator=gen, dtype=DT)
    b = torch.randn(groups * c_out, generator=gen, dtype=DT)
    return [x, w, b]


def _derivatives(conv, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, wrt: list[int]) -> list[torch.Tensor]:
    """Order 1, 2 and 3 derivatives of a nonlinear scalar of ``conv(x, w, b)`` w.r.t. the inputs ``wrt``."""
    leaves = [t.detach().requires_grad_(i in wrt) for i, t in enumerate((x, w, b))]
    loss = conv(*leaves).tanh().square().sum()
    targets = [leaves[i] for i in wrt]
    first = torch.autograd.grad(loss, targets, create_graph=True)
    second = torch.autograd.grad(sum((g.sin() * (k + 1)).sum() for k, g in enumerate(first)), targets,
                                 create_graph=True)
    third = torch.autograd.grad(sum((g * g).sum() for g in second), targets)
    return [*first, *second, *third]


@pytest.mark.parametrize("stride,padding,size", [(2, 1, 14), (2, 1, 7), (1, 1, 9), (2, 0, 8)])
@pytest.mark.parametrize("wrt", [[0, 1, 2], [1, 2], [0]])
def test_derivatives_match_native_conv(stride: int, padding: int, size: int, wrt: list[int]) -> None:
    groups = 3
    x, w, b = _inputs(groups, 4, 5, size)
    ours = _derivatives(lambda x, w, b: grouped_conv2d(x, w, b, (stride,) * 2, (padding,) * 2, (1, 1), groups), x, w,
                        b, wrt)
    ref = _derivatives(lambda x, w, b: F.conv2d(x, w, b, stride, padding, 1, groups), x, w, b, wrt)
    for a, r in zip(ours, ref):
        assert rel_err(a, r) <= 1e-10


def test_gradgradcheck_against_finite_differences() -> None:
    x, w, b = (t.requires_grad_() for t in _inputs(2, 2, 3, 5, seed=1))
    assert torch.autograd.gradgradcheck(lambda x, w, b: grouped_conv2d(x, w, b, (2, 2), (1, 1), (1, 1), 2), (x, w, b))


@pytest.mark.parametrize("create_graph", [False, True])
def test_gradients_are_autograds_bit_for_bit(create_graph: bool) -> None:
    """First-order gradients -- and, under ``create_graph``, the inner gradients' values -- are autograd's own
    (one native backward call): a FOMAML / Reptile / ANIL step, and the inner step of MAML, do not change at all."""
    x, w, b = (t.float() for t in _inputs(4, 8, 8, 14))
    grads = []
    for conv in (lambda *t: grouped_conv2d(*t, (2, 2), (1, 1), (1, 1), 4), lambda *t: F.conv2d(*t, 2, 1, 1, 4)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        grads.append(torch.autograd.grad(conv(*leaves).tanh().sum(), leaves, create_graph=create_graph))
    assert all(torch.equal(a, r) for a, r in zip(*grads))
