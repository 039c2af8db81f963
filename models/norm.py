"""Batch normalisation as every backbone here uses it: batch statistics, no buffers, written with plain tensor ops.

Its own module so that every backbone module (``backbones``, ``resnet12``, ``segmentation``) imports it without
importing each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchNorm2d(nn.Module):
    """Batch normalisation written with plain tensor ops, always normalising with the current batch's statistics.

    Why it exists: under ``torch.func.vmap`` the native ``nn.BatchNorm2d`` (``F.batch_norm``) gives wrong
    second-order MAML gradients (relative error ~1e-2 in float64 in torch 2.14), while the same maths written
    as ``mean``/``var``/``rsqrt`` is exact. MAML's protocol uses batch statistics at train *and* test time
    (transductive), so there are no running-stat buffers and no hidden state: the module is a pure function
    of (parameters, input).

    ``scale=False`` drops the learnable scale (gamma), keeping only the offset (beta): what MAML's reference
    code gets from ``tf.contrib.layers.batch_norm``'s defaults (``center=True, scale=False``, epsilon 1e-3).

    Per-step parameters (MAML++, :func:`make_norm_per_step`): ``weight`` / ``bias`` then hold one row per inner
    step, ``[steps, num_features]``, and the inner loop passes the current step's row through ``functional_call``;
    called with the stacked rows themselves, the layer refuses to guess a step.
    """

    reduce_dims: tuple[int, ...] = (0, 2, 3)
    # The native, fused F.batch_norm instead (same statistics; ~1.5x faster for a ProtoNet step on CPU). Exact with
    # ordinary autograd, not to second order under torch.func transforms: only networks trained without the
    # functional inner loop turn it on (ProtoNet and the baselines, models/baselines.py ``use_native_norm``).
    native: bool = False

    def __init__(self, num_features: int, eps: float = 1e-5, scale: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features)) if scale else None
        self.bias = nn.Parameter(torch.zeros(num_features))

    def _shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias.dim() != 1:
            raise RuntimeError(f"{type(self).__name__} holds per-step parameters {tuple(self.bias.shape)}: run it "
                               "through the inner loop, which passes one step's row (see make_norm_per_step)")
        if self.native:
            weight = torch.ones_like(self.bias) if self.weight is None else self.weight
            return F.batch_norm(x, None, None, weight, self.bias, training=True, momentum=0.0, eps=self.eps)
        mean = x.mean(dim=self.reduce_dims, keepdim=True)
        var = (x - mean).square().mean(dim=self.reduce_dims, keepdim=True)  # biased, as F.batch_norm normalises
        x_hat = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            x_hat = x_hat * self.weight.view(self._shape(x))
        return x_hat + self.bias.view(self._shape(x))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, scale={self.weight is not None}"


class BatchNorm1d(BatchNorm2d):
    """:class:`BatchNorm2d` for ``[B, features]`` inputs (statistics over the batch dim only)."""

    reduce_dims = (0,)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is one of this file's batch-norm layers (``algorithm.adapt_norm`` acts on these)."""
    return isinstance(module, BatchNorm2d)


def make_norm_per_step(model: nn.Module, steps: int) -> list[str]:
    """Give every batch-norm layer of ``model`` one weight and bias per inner step (MAML++'s BNWB), in place.

    Each batch-norm parameter ``[C]`` becomes ``[steps, C]``, every row a copy of its current value, under the same
    name: the parameter set (and so the state dict and checkpoints) says how many steps the network was built for,
    and ``functional_call`` / ``batched_forward`` take one row per step from the inner loop (``step_params``).
    Returns the converted parameter names. Raises ``ValueError`` when ``model`` has no batch norm.
    """
    if steps < 1:
        raise ValueError(f"make_norm_per_step needs steps >= 1, got {steps}")
    names = []
    for prefix, module in model.named_modules():
        if not is_norm(module):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            stacked = param.detach().unsqueeze(0).repeat(steps, *(1,) * param.dim())
            setattr(module, name, nn.Parameter(stacked, requires_grad=param.requires_grad))
            names.append(f"{prefix}.{name}" if prefix else name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no batch-norm parameters to make per-step")
    return names
