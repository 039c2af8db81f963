"""ANIL and Meta-SGD on the one inner loop: float64 parity of every engine with the sequential reference
(<= 1e-10, meta-gradients w.r.t. the parameters AND the learned rates), the identities tying them to MAML, and
the Lightning modules' wiring (which parameters adapt, which receive meta-gradients, which rates evaluation
uses). learn2learn parity is in test_learn2learn_parity.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metabench.datasets.episodes import MetaBatch
from metabench.models.algorithms import ANIL, MAML, MetaSGD
from metabench.models.inner_loop import InnerConfig, Params, adapt_tasks, meta_backward, meta_loss
from metabench.models.learners import algorithm_config, build_algorithm, learner_class
from metabench.models.problems import Classification
from tests.helpers import (
    assert_grads_close,
    conv4_image,
    fit_one_step,
    flat,
    meta_batch,
    rel_err,
    seeded_conv4,
    tiny_config,
)

LR = 0.3
RTOL = 1e-10


def _model(pool: bool = False, global_pool: bool = False) -> nn.Module:
    """The shared float64 Conv4 (6 filters), batch-norm affine moved so that no gradient is trivially 0."""
    return seeded_conv4(6, pool=pool, global_pool=global_pool, bn_noise=0.2)


def _batch(pool: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """3 tasks, 5 support and 4 query images each, random labels (seed 1)."""
    return meta_batch(5, 4, conv4_image(pool), interleave=True)


def _random_lrs(params: Params, requires_grad: bool = True) -> Params:
    """Per-entry rates drawn from U[0.05, 0.35) (seed 2): unequal, so that a mixed-up entry would show."""
    gen = torch.Generator().manual_seed(2)
    return {k: (0.05 + 0.3 * torch.rand(p.shape, generator=gen, dtype=p.dtype)).requires_grad_(requires_grad)
            for k, p in params.items()}


def _grads(model: nn.Module, params: Params, lrs: Params | None, batch: tuple[Tensor, ...], config: InnerConfig,
           engine: str) -> tuple[Tensor, list[Tensor]]:
    """Meta-loss and its gradient w.r.t. every model parameter (adapted or not), then every rate that requires
    grad."""
    loss, _ = meta_loss(model, params, F.cross_entropy, *batch, config, engine, lrs)
    wrt = [*model.parameters(), *(r for r in (lrs or {}).values() if r.requires_grad)]
    return loss.detach(), list(torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True))


# -- Meta-SGD: the inner loop with per-entry rates ------------------------------------------------------------


@pytest.mark.parametrize("engine", ["batched", "vmap"])
@pytest.mark.parametrize("pool,global_pool", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (2, True)])
def test_metasgd_engines_match_sequential(engine: str, pool: bool, global_pool: bool, steps: int,
                                          first_order: bool) -> None:
    model, batch = _model(pool, global_pool), _batch(pool)
    params = dict(model.named_parameters())
    lrs = _random_lrs(params)
    config = InnerConfig(steps=steps, lr=LR, first_order=first_order)
    ref_loss, ref = _grads(model, params, lrs, batch, config, "sequential")
    loss, ours = _grads(model, params, lrs, batch, config, engine)
    assert abs(float(loss - ref_loss)) <= 1e-12 * abs(float(ref_loss))
    assert_grads_close(ours, ref)
    assert flat(ref[len(params):]).norm() > 1e-3  # the rates' meta-gradient is really compared


@pytest.mark.parametrize("engine", ["batched", "vmap"])
def test_metasgd_rates_alone_get_the_second_order_gradient(engine: str) -> None:
    """Parameters outside the outer graph, rates inside it: the rates' meta-gradient is still exact."""
    model, batch = _model(), _batch()
    params = {k: p.detach() for k, p in model.named_parameters()}
    lrs = _random_lrs(params)
    config = InnerConfig(steps=2, lr=LR)
    grads = {}
    for name in ("sequential", engine):
        loss, _ = meta_loss(model, params, F.cross_entropy, *batch, config, name, lrs)
        grads[name] = list(torch.autograd.grad(loss, list(lrs.values())))
    assert_grads_close(grads[engine], grads["sequential"])


@pytest.mark.parametrize("engine", ["sequential", "batched", "vmap"])
def test_metasgd_with_uniform_rates_is_maml(engine: str) -> None:
    """Rates all equal to ``lr`` give MAML's meta-loss and parameter meta-gradient."""
    model, batch = _model(), _batch()
    params = dict(model.named_parameters())
    lrs = {k: torch.full_like(p.detach(), LR) for k, p in params.items()}
    config = InnerConfig(steps=2, lr=LR)
    _, maml = _grads(model, params, None, batch, config, engine)
    _, metasgd = _grads(model, params, lrs, batch, config, engine)
    assert_grads_close(metasgd, maml)


def test_metasgd_chunked_backward_matches_whole_batch() -> None:
    """``meta_backward`` in chunks of one task accumulates the same gradient, rates included."""
    model, batch = _model(), _batch()
    params = dict(model.named_parameters())
    lrs = _random_lrs(params)
    config = InnerConfig(steps=2, lr=LR)
    _, ref = _grads(model, params, lrs, batch, config, "batched")
    meta_backward(model, params, F.cross_entropy, *batch, config, "batched", task_chunk=1, lrs=lrs)
    assert_grads_close([t.grad for t in (*model.parameters(), *lrs.values())], ref)


def test_rates_must_name_the_adapted_parameters() -> None:
    model, (sx, sy, _, _) = _model(), _batch()
    params = {k: p for k, p in model.named_parameters() if k.startswith("head.")}
    with pytest.raises(ValueError, match="lrs must name exactly the adapted parameters"):
        adapt_tasks(params, lambda p, x, y: x.sum(), sx, sy, InnerConfig(1, LR), "sequential",
                    _random_lrs(dict(model.named_parameters())))


# -- ANIL: the inner loop on the head only --------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sequential", "batched", "vmap"])
@pytest.mark.parametrize("steps", [1, 2])
def test_anil_equals_metasgd_with_zero_body_rates(engine: str, steps: int) -> None:
    """Adapting the head only (body read from the module) is exactly Meta-SGD with rate 0 on the body and
    ``lr`` on the head: same meta-loss, same second-order meta-gradient for every parameter, body included."""
    model, batch = _model(), _batch()
    config = InnerConfig(steps=steps, lr=LR)
    head = {k: p for k, p in model.named_parameters() if k.startswith("head.")}
    _, anil = _grads(model, head, None, batch, config, engine)
    everything = dict(model.named_parameters())
    rates = {k: torch.full_like(p.detach(), LR if k in head else 0.0) for k, p in everything.items()}
    _, reference = _grads(model, everything, rates, batch, config, "sequential")
    assert_grads_close(anil, reference)


def _module(name: str, engine: str = "sequential", **fields) -> MAML:
    config = algorithm_config(name=name, inner_lr=LR, inner_steps=2, eval_steps=2, engine=engine, **fields)
    return build_algorithm(_model(), Classification(), config, max_steps=1)  # type: ignore[return-value]


def test_anil_config_adapts_the_head_and_is_second_order() -> None:
    config = algorithm_config(name="anil")
    assert config.adapt == ["head"] and learner_class("anil").capabilities.second_order
    assert algorithm_config(name="anil", adapt=["features.3", "head"]).adapt == ["features.3", "head"]
    module = _module("anil")
    assert type(module) is ANIL and isinstance(module, MAML)
    assert module.params() and all(k.startswith("head.") for k in module.params())


@pytest.mark.parametrize("engine", ["sequential", "batched", "vmap"])
def test_anil_body_untouched_by_adaptation_but_meta_learned(engine: str) -> None:
    module = _module("anil", engine)
    sx, sy, qx, qy = _batch()
    body = {k: p.detach().clone() for k, p in module.backbone.named_parameters() if not k.startswith("head.")}
    params = module.params()
    adapted = adapt_tasks(params, module.task_loss, sx, sy, module.inner_config(True), engine)
    assert set(adapted) == set(params)  # the body is not among the adapted parameters ...
    for k, p in params.items():  # ... while the head really moved, per task
        assert all((adapted[k][t] - p).abs().max() > 1e-6 for t in range(sx.shape[0]))
    loss, _ = meta_loss(module.backbone, params, module.inner_loss, sx, sy, qx, qy, module.inner_config(True), engine)
    loss.backward()
    named = dict(module.backbone.named_parameters())
    for k, before in body.items():
        assert torch.equal(named[k].detach(), before)  # adaptation never wrote to the body
        if named[k].ndim > 1:  # conv weights: a real meta-gradient (conv biases feed batch norm: ~0)
            assert named[k].grad is not None and named[k].grad.norm() > 1e-6, k


def test_anil_training_step_moves_body_and_head(tmp_path: Path) -> None:
    from metabench.run.runner import build_datamodule, build_module

    config = tiny_config(tmp_path, "anil", steps=1, extra=["algorithm.engine=batched"])
    datamodule = build_datamodule(config)
    module = build_module(config, datamodule)
    before = {k: p.detach().clone() for k, p in module.backbone.named_parameters()}
    fit_one_step(module, datamodule)
    moved = {k for k, p in module.backbone.named_parameters() if not torch.equal(p.detach(), before[k])}
    assert any(k.startswith("head.") for k in moved) and any(k.startswith("features.") for k in moved)


# -- Meta-SGD: the Lightning module ---------------------------------------------------------------------------


def test_metasgd_config_checks() -> None:
    assert learner_class("metasgd").capabilities.second_order
    with pytest.raises(ValueError, match="inner_optimizer must be sgd for metasgd"):
        algorithm_config(name="metasgd", inner_optimizer="adam")
    with pytest.raises(ValueError, match="eval_lr must be null for metasgd"):
        algorithm_config(name="metasgd", eval_lr=0.1)


def test_metasgd_rates_have_the_parameters_shapes_and_start_at_inner_lr() -> None:
    module = _module("metasgd", adapt=["features.3", "head"])
    assert isinstance(module, MetaSGD)
    rates, params = module.inner_lrs(), module.params()
    assert list(rates) == list(params)
    for k, p in params.items():
        assert rates[k].shape == p.shape and rates[k].dtype == p.dtype and torch.all(rates[k] == LR)
    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert {id(r) for r in rates.values()} <= optimized  # the outer Adam step meta-learns the rates


def _eval_batch() -> MetaBatch:
    sx, sy, qx, qy = _batch()
    return MetaBatch(sx, sy, qx, qy, torch.zeros(sx.shape[0], 5, dtype=torch.long))


@pytest.mark.parametrize("engine", ["sequential", "batched"])
def test_metasgd_evaluation_adapts_with_the_learned_rates(engine: str) -> None:
    metasgd, maml = _module("metasgd", engine), _module("maml", engine)
    batch = _eval_batch()
    # initial rates (= inner_lr everywhere): exactly MAML's evaluation with the same step size
    assert rel_err(metasgd.evaluate_outputs(batch), maml.evaluate_outputs(batch)) <= RTOL
    with torch.no_grad():  # learned rates of 0: evaluation leaves the initialization as it is
        for rate in metasgd.learned_lrs.values():
            rate.zero_()
    unadapted = torch.stack([metasgd.backbone(x) for x in batch.query_x]).detach()
    assert rel_err(metasgd.evaluate_outputs(batch), unadapted) <= RTOL


def test_metasgd_training_step_learns_the_rates(tmp_path: Path) -> None:
    from metabench.run.runner import build_datamodule, build_module

    config = tiny_config(tmp_path, "metasgd", steps=1, extra=["algorithm.engine=batched"])
    datamodule = build_datamodule(config)
    module = build_module(config, datamodule)
    assert isinstance(module, MetaSGD)
    before = {k: r.detach().clone() for k, r in module.inner_lrs().items()}
    fit_one_step(module, datamodule)
    moved = {k for k, r in module.inner_lrs().items() if not torch.equal(r.detach(), before[k])}
    assert {"head.weight", "head.bias"} <= moved and any(k.startswith("features.") for k in moved)
