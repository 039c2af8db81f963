"""Parity with learn2learn 0.2.0: metabench's MAML / FOMAML meta-gradients equal ``l2l.algorithms.MAML``'s, and
its Meta-SGD meta-gradients (w.r.t. the parameters and the per-parameter rates) ``l2l.algorithms.MetaSGD``'s.

learn2learn is an optional oracle, never a dependency of metabench: install it with
``bash scripts/install_learn2learn.sh``. Without it this module skips on a developer machine but FAILS
under CI (``CI`` set), where ``.ci/run`` installs it first, so the parity check cannot silently vanish.

Same float64 Conv4 init (deep copy), same random 5-way 1-shot meta-batch of 3 tasks (5 support, 10 query
each), inner lr 0.4, 1 and 2 inner steps. learn2learn differentiates through ``clone()`` / ``adapt()`` on a
stateful module; metabench through ``torch.func`` on a parameter dict, with both task engines.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metabench.models.inner_loop import InnerConfig, meta_loss
from tests.helpers import TASKS, WAYS, flat, meta_batch, rel_err, seeded_conv4, seeded_mlp

if os.environ.get("CI"):
    try:
        import learn2learn as l2l
    except ImportError as error:  # CI runs scripts/install_learn2learn.sh before pytest
        pytest.fail(f"learn2learn is not importable under CI ({error}); "
                    "run `bash scripts/install_learn2learn.sh` first", pytrace=False)
else:
    l2l = pytest.importorskip("learn2learn", reason="optional oracle: bash scripts/install_learn2learn.sh")

pytestmark = pytest.mark.l2l

SHOTS, QUERIES, SIZE = 1, 2, 28
LR = 0.4
RTOL = 1e-10


def _model(backbone: str = "conv4") -> nn.Module:
    """Float64 Conv4 (8 filters), or MAML's non-convolutional MLP (narrowed, batch norm without scale)."""
    if backbone == "mlp":  # every parameter moved well above the paper's 0.01 init: every gradient is well above 0
        return seeded_mlp(SIZE, (32, 16, 8, 8), only_norm=False)
    return seeded_conv4(8)


def _batch() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random float64 N(0, 1) images: support ``[T, 5, 1, 28, 28]``, query ``[T, 10, 1, 28, 28]``; each task
    gets its own label order, as a task sampler's relabelling would."""
    return meta_batch(WAYS * SHOTS, WAYS * QUERIES, (1, SIZE, SIZE), normal=True, support_labels="balanced",
                      query_labels="balanced")


def _l2l_meta_loss(wrapper: nn.Module, batch: tuple[Tensor, ...], steps: int) -> Tensor:
    """learn2learn's documented loop (MAML or MetaSGD wrapper): clone + adapt per task, mean query loss."""
    xs, ys, xq, yq = batch
    total = torch.zeros((), dtype=torch.float64)
    for t in range(TASKS):
        learner = wrapper.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(xs[t]), ys[t]))
        total = total + F.cross_entropy(learner(xq[t]), yq[t])
    return total / TASKS


def _l2l_grads(model: nn.Module, batch: tuple[Tensor, ...], steps: int,
               first_order: bool) -> tuple[Tensor, list[Tensor]]:
    """learn2learn's reference: clone + adapt per task, query loss averaged over tasks, grads w.r.t. the init."""
    maml = l2l.algorithms.MAML(model, lr=LR, first_order=first_order)
    loss = _l2l_meta_loss(maml, batch, steps)
    return loss.detach(), list(torch.autograd.grad(loss, list(maml.module.parameters())))


def _metabench_grads(model: nn.Module, batch: tuple[Tensor, ...], steps: int, first_order: bool,
                     engine: str) -> tuple[Tensor, list[Tensor]]:
    xs, ys, xq, yq = batch
    params = dict(model.named_parameters())
    config = InnerConfig(steps=steps, lr=LR, first_order=first_order)
    loss, _ = meta_loss(model, params, F.cross_entropy, xs, ys, xq, yq, config, engine)
    return loss.detach(), list(torch.autograd.grad(loss, list(params.values())))


def _assert_grads_equal(ours: list[Tensor], ref: list[Tensor], names: list[str]) -> None:
    """Relative to the whole meta-gradient: conv biases feed batch norm, so their gradients are ~0 (pure
    round-off) and a per-tensor relative error would be meaningless for them."""
    scale = flat(ref).abs().max().item()
    assert scale > 1e-3, "reference meta-gradient is ~0: the comparison would be vacuous"
    rel = rel_err(ours, ref)
    assert rel <= RTOL, f"relative error of the meta-gradient {rel:.3e} > {RTOL:.0e}"
    for name, a, b in zip(names, ours, ref):
        worst = (a - b).abs().max().item()
        assert worst <= RTOL * scale, f"{name}: max |diff| {worst:.3e} > {RTOL:.0e} * {scale:.3e}"


@pytest.mark.parametrize("backbone,engine", [("conv4", "vmap"), ("conv4", "sequential"), ("mlp", "batched"),
                                            ("mlp", "sequential")])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_matches_learn2learn(steps: int, first_order: bool, backbone: str, engine: str) -> None:
    model = _model(backbone)
    reference = copy.deepcopy(model)  # same init, own autograd graph
    batch = _batch()

    ref_loss, ref_grads = _l2l_grads(reference, batch, steps, first_order)
    loss, grads = _metabench_grads(model, batch, steps, first_order, engine)

    assert abs(loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    _assert_grads_equal(grads, ref_grads, [name for name, _ in model.named_parameters()])


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_terms_are_not_negligible(steps: int) -> None:
    """Guards the parity test's power: on this setup MAML and FOMAML meta-gradients differ clearly, so
    matching learn2learn in both modes really checks the second-order terms (and their absence)."""
    model = _model()
    batch = _batch()
    _, second = _metabench_grads(model, batch, steps, first_order=False, engine="sequential")
    _, first = _metabench_grads(model, batch, steps, first_order=True, engine="sequential")
    assert rel_err(first, second) > 1e-3


def _random_lrs(model: nn.Module) -> list[Tensor]:
    """Per-entry Meta-SGD rates from U[0.05, 0.35) (seed 2): unequal, so that a mixed-up entry would show."""
    gen = torch.Generator().manual_seed(2)
    return [0.05 + 0.3 * torch.rand(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]


def _l2l_metasgd_grads(model: nn.Module, rates: list[Tensor], batch: tuple[Tensor, ...], steps: int,
                       first_order: bool) -> tuple[Tensor, list[Tensor]]:
    """learn2learn's Meta-SGD: clone (parameters and rates) + adapt per task; grads w.r.t. init, then rates."""
    lrs = nn.ParameterList([nn.Parameter(r.clone()) for r in rates])
    meta = l2l.algorithms.MetaSGD(model, first_order=first_order, lrs=lrs)
    loss = _l2l_meta_loss(meta, batch, steps)
    return loss.detach(), list(torch.autograd.grad(loss, [*meta.module.parameters(), *meta.lrs]))


def _metabench_metasgd_grads(model: nn.Module, rates: list[Tensor], batch: tuple[Tensor, ...], steps: int,
                             first_order: bool, engine: str) -> tuple[Tensor, list[Tensor]]:
    params = dict(model.named_parameters())
    lrs = {k: r.clone().requires_grad_() for k, r in zip(params, rates)}
    config = InnerConfig(steps=steps, lr=LR, first_order=first_order)  # lr unused: the rates replace it
    loss, _ = meta_loss(model, params, F.cross_entropy, *batch, config, engine, lrs)
    return loss.detach(), list(torch.autograd.grad(loss, [*params.values(), *lrs.values()]))


@pytest.mark.parametrize("backbone,engine", [("conv4", "vmap"), ("conv4", "batched"), ("conv4", "sequential"),
                                            ("mlp", "batched")])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("steps", [1, 2])
def test_metasgd_meta_gradient_matches_learn2learn(steps: int, first_order: bool, backbone: str, engine: str) -> None:
    """Meta-SGD: the meta-gradient w.r.t. theta AND alpha equals learn2learn's (float64, <= 1e-10)."""
    model = _model(backbone)
    reference = copy.deepcopy(model)
    rates = _random_lrs(model)
    batch = _batch()

    ref_loss, ref_grads = _l2l_metasgd_grads(reference, rates, batch, steps, first_order)
    loss, grads = _metabench_metasgd_grads(model, rates, batch, steps, first_order, engine)

    assert abs(loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    names = [name for name, _ in model.named_parameters()]
    _assert_grads_equal(grads, ref_grads, names + [f"lr[{name}]" for name in names])
    count = len(names)  # the rates' part alone is far from 0 and matches too (not drowned by theta's scale)
    assert flat(ref_grads[count:]).abs().max().item() > 1e-3
    assert rel_err(grads[count:], ref_grads[count:]) <= RTOL


def test_oracle_version() -> None:
    """The oracle is pinned: scripts/install_learn2learn.sh installs exactly 0.2.0."""
    assert l2l.__version__ == "0.2.0"
