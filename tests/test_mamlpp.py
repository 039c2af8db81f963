"""MAML++ (Antoniou et al. 2019) on the one inner loop, in float64 against plain references written here with
``torch.autograd.grad`` loops (none of them call ``metabench.models.inner_loop``): every engine's meta-gradient
w.r.t. the parameters, the per-step rates (LSLR) and the per-step batch norm (BNWB), first and second order, with
the multi-step loss (MSL); the identities the issue names (MSL = weighted sum of per-step query losses, LSLR with
one step = Meta-SGD with per-layer tied rates, DA = FOMAML before the switch and MAML after, per-step batch norm
gets gradient only from its step); the schedules (MSL weights, cosine annealing) against the authors' formulas;
the Lightning module's wiring and checkpoints; the configuration checks; and a whole ``metabench run``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metabench.datasets.episodes import MetaBatch
from metabench.models.algorithms import MAML, MAMLPlusPlus, cosine_lr, msl_weights
from metabench.models.backbones import is_norm, make_norm_per_step
from metabench.models.hparams import AlgorithmConfig
from metabench.models.inner_loop import InnerConfig, Params, meta_backward, meta_loss
from metabench.models.learners import algorithm_config, build_algorithm, learner_class
from metabench.models.problems import Classification
from metabench.run.config import resolve
from metabench.run.records import read_record
from tests.helpers import (
    DT,
    TINY_RUN,
    assert_grads_close,
    conv4_image,
    flat,
    meta_batch,
    rel_err,
    seeded_conv4,
    set_flags,
    tiny_config,
)

STEPS = 3
LR = 0.3
RTOL = 1e-10
ENGINES = ["sequential", "vmap", "batched"]


# -- float64 fixtures -----------------------------------------------------------------------------------------


def _model(per_step_bn: bool = True, steps: int = STEPS) -> tuple[nn.Module, list[str]]:
    """The shared float64 Conv4 (6 filters); with per-step batch norm every row is moved differently (seed 4)."""
    model = seeded_conv4(6, bn_noise=0.2)
    if not per_step_bn:
        return model, []
    names = make_norm_per_step(model, steps)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=DT))
    return model, names


def _batch() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """3 tasks, 5 support and 4 query images each, random labels (seed 1)."""
    return meta_batch(5, 4, conv4_image(False), interleave=True)


def _norm_names(model: nn.Module) -> list[str]:
    return [f"{m}.{p}" for m, module in model.named_modules() if is_norm(module) for p, _ in module.named_parameters()]


def _split(model: nn.Module, names: list[str]) -> tuple[Params, Params | None]:
    """(adapted parameters: all but batch norm, per-step batch norm or None)."""
    named = dict(model.named_parameters())
    adapted = {k: v for k, v in named.items() if k not in _norm_names(model)}
    return adapted, ({k: named[k] for k in names} if names else None)


def _step_rates(params: Params, steps: int = STEPS) -> list[Params]:
    """LSLR: one 0-dim rate per parameter tensor and step, U[0.1, 0.4) (seed 2): unequal, so a mix-up shows."""
    gen = torch.Generator().manual_seed(2)
    return [{k: (0.1 + 0.3 * torch.rand((), generator=gen, dtype=DT)).requires_grad_() for k in params}
            for _ in range(steps)]


def reference(model: nn.Module, params: Params, step_params: Params | None, rates: list[Params] | None,
              weights: list[float], batch: tuple[Tensor, ...], first_order: bool) -> Tensor:
    """MAML++'s meta-loss by hand: per task, inner step ``i`` runs the network with batch-norm row ``i - 1`` and
    rates ``rates[i - 1]`` (else ``LR``); the query loss after step ``i`` (same row) enters with ``weights[i - 1]``;
    first order treats every inner gradient as a constant."""
    sx, sy, qx, qy = batch
    total = torch.zeros((), dtype=DT)
    for t in range(sx.shape[0]):
        p = dict(params)
        for i, weight in enumerate(weights):
            rows = {k: v[i] for k, v in (step_params or {}).items()}
            loss = F.cross_entropy(functional_call(model, {**rows, **p}, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
            p = {k: p[k] - (rates[i][k] if rates else LR) * g for k, g in zip(p, grads)}
            if weight:
                query = F.cross_entropy(functional_call(model, {**rows, **p}, (qx[t],)), qy[t])
                total = total + weight * query / sx.shape[0]
    return total


def _wrt(model: nn.Module, rates: list[Params] | None) -> list[Tensor]:
    return [*model.parameters(), *(r for step in rates or [] for r in step.values())]


# -- every new gradient path against the reference ------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("msl,lslr,per_step_bn", [(True, True, True), (True, False, False), (False, True, False),
                                                  (False, False, True)], ids=["all", "msl", "lslr", "bn"])
def test_meta_gradient_matches_reference(engine: str, first_order: bool, msl: bool, lslr: bool,
                                         per_step_bn: bool) -> None:
    model, names = _model(per_step_bn)
    params, step_params = _split(model, names)
    rates = _step_rates(params) if lslr else None
    weights = [0.2, 0.3, 0.5] if msl else [0.0, 0.0, 1.0]
    batch = _batch()
    config = InnerConfig(steps=STEPS, lr=LR, first_order=first_order)
    loss, outputs = meta_loss(model, params, F.cross_entropy, *batch, config, engine, rates, step_params,
                              weights if msl else None)
    ref = reference(model, params, step_params, rates, weights, batch, first_order)
    assert abs(float(loss.detach() - ref.detach())) <= 1e-12 * abs(float(ref.detach()))
    assert outputs.shape == (3, 4, 5) and not outputs.requires_grad
    wrt = _wrt(model, rates)
    ours = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    expected = torch.autograd.grad(ref, wrt, allow_unused=True, materialize_grads=True)
    assert_grads_close(list(ours), list(expected))
    if rates:  # the rates' meta-gradient is really compared (not drowned by the parameters')
        count = len(list(model.parameters()))
        assert flat(expected[count:]).norm() > 1e-3 and rel_err(ours[count:], expected[count:]) <= RTOL
    if step_params:
        bn = [g for (name, _), g in zip(model.named_parameters(), expected) if name in names]
        assert flat(bn).norm() > 1e-3


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_chunked_backward_with_every_switch_equals_whole_batch(engine: str) -> None:
    model, names = _model()
    params, step_params = _split(model, names)
    rates = _step_rates(params)
    config = InnerConfig(steps=STEPS, lr=LR)
    loss, _ = meta_loss(model, params, F.cross_entropy, *_batch(), config, engine, rates, step_params, [0.2, 0.3, 0.5])
    ref = torch.autograd.grad(loss, _wrt(model, rates), allow_unused=True, materialize_grads=True)
    chunked, _ = meta_backward(model, params, F.cross_entropy, *_batch(), config, engine, 2, rates, step_params,
                               [0.2, 0.3, 0.5])
    assert abs(float(chunked) - float(loss.detach())) <= 1e-12
    assert_grads_close([t.grad if t.grad is not None else torch.zeros_like(t) for t in _wrt(model, rates)], list(ref))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("engine", ["batched", "vmap"])
def test_cuda_parity_against_cpu_sequential(engine: str) -> None:
    """Every switch's gradient path on CUDA, float64, second order (<= 1e-10 vs the CPU sequential engine)."""
    model, names = _model()
    params, step_params = _split(model, names)
    rates = _step_rates(params)
    config = InnerConfig(steps=STEPS, lr=LR)
    loss, _ = meta_loss(model, params, F.cross_entropy, *_batch(), config, "sequential", rates, step_params,
                        [0.2, 0.3, 0.5])
    ref = torch.autograd.grad(loss, _wrt(model, rates), allow_unused=True, materialize_grads=True)
    model.cuda()
    params, step_params = _split(model, names)
    rates = [{k: r.detach().cuda().requires_grad_() for k, r in step.items()} for step in rates]
    loss, _ = meta_loss(model, params, F.cross_entropy, *(t.cuda() for t in _batch()), config, engine, rates,
                        step_params, [0.2, 0.3, 0.5])
    ours = torch.autograd.grad(loss, _wrt(model, rates), allow_unused=True, materialize_grads=True)
    assert_grads_close([g.cpu() for g in ours], list(ref))


# -- the identities of the issue ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_msl_loss_is_the_weighted_sum_of_the_step_query_losses(engine: str) -> None:
    """Each step's query loss computed by hand (plain SGD steps, mean cross-entropy per task, mean over tasks),
    then weighted; a weight of 0 drops its step."""
    model, _ = _model(per_step_bn=False)
    params = dict(model.named_parameters())
    sx, sy, qx, qy = _batch()
    step_losses = []
    for i in range(1, STEPS + 1):
        per_task = []
        for t in range(sx.shape[0]):
            p = {k: v.detach() for k, v in params.items()}
            for _ in range(i):
                p = {k: v.requires_grad_() for k, v in p.items()}
                support = F.cross_entropy(functional_call(model, p, (sx[t],)), sy[t])
                grads = torch.autograd.grad(support, list(p.values()))
                p = {k: (v - LR * g).detach() for (k, v), g in zip(p.items(), grads)}
            per_task.append(F.cross_entropy(functional_call(model, p, (qx[t],)), qy[t]))
        step_losses.append(torch.stack(per_task).mean())
    config = InnerConfig(steps=STEPS, lr=LR)
    for weights in ([0.2, 0.3, 0.5], [0.0, 0.25, 0.75], msl_weights(STEPS, 4, 10)):
        loss, _ = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, config, engine, step_weights=weights)
        expected = sum(w * step for w, step in zip(weights, step_losses))
        assert abs(float(loss.detach()) - float(expected)) <= 1e-12 * float(expected)
    final, _ = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, config, engine)  # MAML: the last one
    assert abs(float(final.detach()) - float(step_losses[-1])) <= 1e-12 * float(step_losses[-1])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_lslr_with_one_step_is_metasgd_with_per_layer_tied_rates(engine: str, first_order: bool) -> None:
    """One step of LSLR (one rate per parameter tensor) = Meta-SGD whose per-entry rates are that tensor's rate
    everywhere: same meta-loss and parameter meta-gradient, and the LSLR rate's gradient is the sum of the tied
    Meta-SGD rates' gradients."""
    model, _ = _model(per_step_bn=False)
    params = dict(model.named_parameters())
    batch = _batch()
    config = InnerConfig(steps=1, lr=LR, first_order=first_order)
    [rates] = _step_rates(params, 1)
    tied = {k: torch.full_like(p.detach(), float(rates[k].detach())).requires_grad_() for k, p in params.items()}
    lslr_loss, _ = meta_loss(model, params, F.cross_entropy, *batch, config, engine, [rates])
    sgd_loss, _ = meta_loss(model, params, F.cross_entropy, *batch, config, engine, tied)
    assert float(lslr_loss.detach()) == pytest.approx(float(sgd_loss.detach()), rel=1e-14, abs=0)
    ours = torch.autograd.grad(lslr_loss, [*params.values(), *rates.values()])
    theirs = torch.autograd.grad(sgd_loss, [*params.values(), *tied.values()])
    count = len(params)
    assert_grads_close(list(ours[:count]), list(theirs[:count]))
    assert_grads_close(list(ours[count:]), [g.sum() for g in theirs[count:]])


def _module(engine: str = "sequential", max_steps: int = 100, **fields) -> MAML:
    base = dict(name="mamlpp", inner_steps=STEPS, eval_steps=STEPS, inner_lr=LR, engine=engine, adapt_norm=False,
                steps_per_epoch=10)
    config = AlgorithmConfig(**{**base, **fields})
    return build_algorithm(seeded_conv4(6, bn_noise=0.2), Classification(), config, max_steps)  # type: ignore[return-value]


def _meta_batch() -> MetaBatch:
    sx, sy, qx, qy = _batch()
    return MetaBatch(sx, sy, qx, qy, torch.zeros(sx.shape[0], 5, dtype=torch.long))


def _step_gradient(module: MAML, epoch: int = 0) -> list[Tensor]:
    """The module's own training step at ``epoch`` (automatic optimization: the returned loss, back-propagated),
    Lightning's logging switched off: the meta-gradient of every parameter, zeros where none arrives."""
    module.epoch = lambda: epoch  # type: ignore[method-assign]
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.zero_grad(set_to_none=True)
    module.training_step(_meta_batch(), 0).backward()
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


@pytest.mark.parametrize("engine", ENGINES)
def test_da_gradient_is_fomamls_before_the_switch_and_mamls_after(engine: str) -> None:
    """Derivative-order annealing over 2 epochs of 10 steps: the module's meta-gradient at epoch 1 is the FOMAML
    module's, at epoch 2 the MAML module's (same initialization, same batch), and the two differ."""
    da = _module(engine, first_order_epochs=2)
    fomaml = build_algorithm(seeded_conv4(6, bn_noise=0.2), Classification(), algorithm_config(
        name="fomaml", inner_steps=STEPS, eval_steps=STEPS, inner_lr=LR, engine=engine, adapt_norm=False), 100)
    maml = build_algorithm(seeded_conv4(6, bn_noise=0.2), Classification(), algorithm_config(
        name="maml", inner_steps=STEPS, eval_steps=STEPS, inner_lr=LR, engine=engine, adapt_norm=False), 100)
    assert da.inner_config(True).first_order and da.inner_config(False).first_order  # epoch 0; evaluation
    before, after = _step_gradient(da, 1), _step_gradient(da, 2)
    first, second = _step_gradient(fomaml), _step_gradient(maml)
    assert_grads_close(before, first)
    assert_grads_close(after, second)
    assert rel_err(first, second) > 1e-3


@pytest.mark.parametrize("engine", ENGINES)
def test_per_step_batch_norm_gets_gradient_only_from_its_step(engine: str) -> None:
    """The query loss after step j alone (weight 1 there, 0 elsewhere), second order: rows 0..j-1 receive gradient
    (through the inner steps they took part in), rows j.. none at all. First order: only row j-1, the one that
    query forward used."""
    model, names = _model()
    params, step_params = _split(model, names)
    for first_order in (False, True):
        config = InnerConfig(steps=STEPS, lr=LR, first_order=first_order)
        for j in range(1, STEPS + 1):
            weights = [1.0 if i == j else 0.0 for i in range(1, STEPS + 1)]
            loss, _ = meta_loss(model, params, F.cross_entropy, *_batch(), config, engine, None, step_params, weights)
            grads = torch.autograd.grad(loss, list(step_params.values()))
            for name, g in zip(step_params, grads):
                for row in range(STEPS):
                    if row == j - 1 or (not first_order and row < j):
                        assert g[row].norm() > 1e-6, (first_order, j, name, row)
                    else:
                        assert torch.count_nonzero(g[row]) == 0, (first_order, j, name, row)


# -- schedules ------------------------------------------------------------------------------------------------


def test_msl_weights_are_the_authors_annealing() -> None:
    """few_shot_learning_system.py get_per_step_loss_importance_vector, worked by hand for 5 steps, 10 epochs:
    decay 1/5/10 = 0.02 per epoch from each earlier step (floor 0.03/5 = 0.006), the last step gains 4 x 0.02."""
    assert msl_weights(5, 0, 10) == pytest.approx([0.2] * 5, abs=1e-15)
    assert msl_weights(5, 3, 10) == pytest.approx([0.14] * 4 + [0.44], abs=1e-15)
    assert msl_weights(5, 9, 10) == pytest.approx([0.02] * 4 + [0.92], abs=1e-15)
    assert msl_weights(5, 10, 10) == [0.0, 0.0, 0.0, 0.0, 1.0]  # from msl_epochs on: the last step only
    # 15 epochs (mini-ImageNet): the floor 0.006 binds at epoch 14 (0.2 - 14/75 = 0.0133 > 0.006: not yet)
    assert msl_weights(5, 14, 15)[0] == pytest.approx(0.2 - 14 / 75, abs=1e-15)
    assert msl_weights(2, 9, 10) == pytest.approx([max(0.5 - 9 * 0.05, 0.015), min(0.5 + 9 * 0.05, 0.985)])
    assert msl_weights(1, 0, 10) == [1.0]
    for epoch in range(10):
        assert sum(msl_weights(5, epoch, 10)) == pytest.approx(1.0, abs=1e-12)


def test_cosine_lr_is_torch_cosine_annealing_per_epoch() -> None:
    epochs, lr, lr_min = 100, 1e-3, 1e-5
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=lr_min)
    for epoch in range(epochs):
        assert cosine_lr(epoch, epochs, lr, lr_min) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        scheduler.step()
    assert cosine_lr(0, epochs, lr, lr_min) == lr and cosine_lr(50, epochs, lr, lr_min) == pytest.approx(
        (lr + lr_min) / 2, rel=1e-12)


def test_module_schedules_follow_the_epoch() -> None:
    module = _module(msl=True, msl_epochs=3, first_order_epochs=2, cosine_annealing=True, meta_lr_min=1e-4,
                     max_steps=100)
    for epoch in range(6):
        module.epoch = lambda e=epoch: e  # type: ignore[method-assign]
        assert module.step_weights() == (msl_weights(STEPS, epoch, 3) if epoch < 3 else None)  # None: MAML's
        assert module.inner_config(True).first_order == (epoch < 2)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    for step in range(100):  # 10 epochs of 10 steps: constant within an epoch
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine_lr(step // 10, 10, 1e-3, 1e-4), rel=1e-12)
        optimizer.step()
        scheduler.step()
    assert not isinstance(_module().configure_optimizers(), dict)  # no CA: a plain Adam, as MAML


# -- the Lightning module -------------------------------------------------------------------------------------


def test_switches_off_is_maml_bit_for_bit() -> None:
    """mamlpp with every switch off trains and evaluates exactly like maml (same initialization and batch)."""
    for engine in ENGINES:
        plus = _module(engine)
        maml = build_algorithm(seeded_conv4(6, bn_noise=0.2), Classification(), AlgorithmConfig(
            name="maml", inner_steps=STEPS, eval_steps=STEPS, inner_lr=LR, engine=engine, adapt_norm=False), 100)
        assert type(plus) is MAMLPlusPlus and plus.inner_lrs() is None and plus.step_params() is None
        assert plus.step_weights() is None
        assert all(torch.equal(a, b) for a, b in zip(_step_gradient(plus), _step_gradient(maml)))
        assert torch.equal(plus.evaluate_outputs(_meta_batch()), maml.evaluate_outputs(_meta_batch()))


def test_module_parameters_optimizer_and_checkpoint(tmp_path: Path) -> None:
    module = _module(lslr=True, per_step_bn=True, eval_steps=2)
    named = dict(module.backbone.named_parameters())
    bn = _norm_names(module.backbone)
    assert module.per_step_names == bn and all(named[k].shape[0] == STEPS and named[k].dim() == 2 for k in bn)
    assert set(module.params()).isdisjoint(bn)  # meta-learned, never adapted
    rates = module.inner_lrs()
    assert len(rates) == STEPS and all(list(r) == list(module.params()) for r in rates)
    assert all(r.dim() == 0 and float(r.detach()) == LR for step in rates for r in step.values())
    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert {id(named[k]) for k in bn} | {id(p) for p in module.step_lrs.values()} <= optimized
    with pytest.raises(RuntimeError, match="per-step parameters"):  # the stacked rows are never used as one
        module.backbone(torch.zeros(2, 1, 28, 28, dtype=DT))
    # a checkpoint round trip into a fresh module of the same config gives the same evaluation
    with torch.no_grad():
        for p in (*module.step_lrs.values(), *(named[k] for k in bn)):
            p.add_(0.05 * torch.rand_like(p))
    torch.save(module.state_dict(), tmp_path / "state.pt")
    fresh = _module(lslr=True, per_step_bn=True, eval_steps=2)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert torch.equal(fresh.evaluate_outputs(_meta_batch()), module.evaluate_outputs(_meta_batch()))


@pytest.mark.parametrize("bn_mode", ["transductive", "non-transductive"])
def test_evaluation_uses_the_learned_rates_and_the_last_steps_batch_norm(bn_mode: str) -> None:
    """Evaluation with k < inner_steps steps: the rates of steps 1..k, batch-norm rows 0..k-1, the queries scored
    with row k-1, first order, by hand; every engine gives the same outputs."""
    module = _module(lslr=True, per_step_bn=True, eval_steps=2, bn_mode=bn_mode)
    with torch.no_grad():
        for p in module.step_lrs.values():
            p.copy_(torch.tensor([0.1, 0.25, 0.4], dtype=DT))
    named = dict(module.backbone.named_parameters())
    params = {k: v.detach() for k, v in named.items() if k not in module.per_step_names}
    rows = [{k: named[k].detach()[i] for k in module.per_step_names} for i in range(STEPS)]
    sx, sy, qx, _ = _batch()
    expected = []
    for t in range(sx.shape[0]):
        p = dict(params)
        for i, rate in enumerate((0.1, 0.25)):
            p = {k: v.requires_grad_() for k, v in p.items()}
            loss = F.cross_entropy(functional_call(module.backbone, {**rows[i], **p}, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, list(p.values()))
            p = {k: (v - rate * g).detach() for (k, v), g in zip(p.items(), grads)}
        final = {**rows[1], **p}
        if bn_mode == "transductive":
            expected.append(functional_call(module.backbone, final, (qx[t],)))
        else:
            expected.append(torch.stack([functional_call(module.backbone, final, (torch.cat([sx[t], q[None]]),))[-1]
                                         for q in qx[t]]))
    expected = torch.stack(expected).detach()
    for engine in ENGINES:
        module.engine = engine
        assert rel_err(module.evaluate_outputs(_meta_batch()), expected) <= RTOL


def test_config_checks() -> None:
    assert learner_class("mamlpp").capabilities.second_order
    for key, value in (("msl", True), ("lslr", True), ("per_step_bn", True), ("first_order_epochs", 2),
                       ("cosine_annealing", True)):
        with pytest.raises(ValueError, match=f"algorithm.{key} is not used by .*a MAML\\+\\+ switch"):
            algorithm_config(name="maml", **{key: value})
    with pytest.raises(ValueError, match="per_step_bn needs adapt_norm=false"):
        algorithm_config(name="mamlpp", per_step_bn=True, eval_steps=1)
    with pytest.raises(ValueError, match="eval_steps .* must be <= inner_steps"):
        algorithm_config(name="mamlpp", lslr=True, inner_steps=2, eval_steps=3)
    with pytest.raises(ValueError, match="eval_lr must be null with lslr"):
        algorithm_config(name="mamlpp", lslr=True, eval_lr=0.1, eval_steps=1)
    with pytest.raises(ValueError, match="inner_optimizer must be sgd with lslr"):
        algorithm_config(name="mamlpp", lslr=True, inner_optimizer="adam", eval_steps=1)
    with pytest.raises(ValueError, match="meta_lr_min"):
        algorithm_config(name="mamlpp", cosine_annealing=True, meta_lr_min=0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        algorithm_config(name="mamlpp", steps_per_epoch=0)
    with pytest.raises(ValueError, match="no batch-norm"):
        make_norm_per_step(nn.Linear(2, 2), 3)


# -- presets and a whole run ----------------------------------------------------------------------------------

PAPER_BENCHMARKS = ("omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s", "mini-imagenet-5w1s",
                    "mini-imagenet-5w5s")
ABLATIONS = {"ablation-no-msl": "msl", "ablation-no-lslr": "lslr", "ablation-no-bn": "per_step_bn",
             "ablation-no-da": "first_order_epochs", "ablation-no-ca": "cosine_annealing"}


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_paper_presets_are_the_authors_configs(benchmark: str) -> None:
    config = resolve(benchmark, "mamlpp")
    a, omniglot = config.algorithm, benchmark.startswith("omniglot")
    assert config.preset == "paper" and "1810.09502" in a.source and "HowToTrainYourMAMLPytorch" in a.source
    assert (a.inner_steps, a.eval_steps, a.meta_lr, a.inner_loss_scale, a.steps_per_epoch) == (5, 5, 1e-3, 1.0, 500)
    assert (a.msl, a.lslr, a.per_step_bn, a.adapt_norm, a.first_order_epochs) == (True, True, True, False, 0)
    assert (a.meta_batch, a.inner_lr, a.msl_epochs) == ((8, 0.1, 10) if omniglot else (2, 0.01, 15))
    assert (a.cosine_annealing, a.meta_lr_min) == ((True, 1e-5) if omniglot else (False, 0.0))
    assert config.trainer.max_steps == 50_000
    m = config.model
    assert m.backbone == "conv4" and m.invert is False
    assert m.options == {"hidden": 64 if omniglot else 48, "pool": True, "activation": "leaky_relu",
                         "norm_eps": 1e-5, "norm_scale": True}
    assert (config.episodes.train_queries or config.episodes.queries) == (1 if omniglot else 15)
    if omniglot:
        assert config.data.options == {"scheme": "maml"}
        assert config.episodes.shots + config.episodes.queries <= 20


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_paper_preset_modules_take_a_training_step(benchmark: str) -> None:
    """The authors' network and switches, built from the preset (28x28 Omniglot: 64 -> 1x1 maps; 84x84
    mini-ImageNet: 48 x 5x5), take one second-order MSL step on a one-task stand-in batch of the benchmark's shape;
    every parameter kind (conv, per-step batch norm, head, per-step rates) gets a meta-gradient. One query per
    class keeps the mini-ImageNet step short on a CPU."""
    from metabench.models.backbones import build_backbone

    config = resolve(benchmark, "mamlpp", overrides=["algorithm.engine=batched"])
    e, omniglot = config.episodes, benchmark.startswith("omniglot")
    channels, size = (1, 28) if omniglot else (3, 84)
    backbone = build_backbone(config.model.backbone, channels, e.ways, size, **config.model.options)
    assert backbone.feature_size == (64 if omniglot else 48 * 25)
    module = build_algorithm(backbone, Classification(invert=config.model.invert), config.algorithm,
                             config.trainer.max_steps)
    gen = torch.Generator().manual_seed(0)
    queries = 1
    sx = torch.randint(0, 256, (1, e.ways * e.shots, channels, size, size), generator=gen, dtype=torch.uint8)
    qx = torch.randint(0, 256, (1, e.ways * queries, channels, size, size), generator=gen, dtype=torch.uint8)
    batch = MetaBatch(sx, torch.arange(e.ways).repeat_interleave(e.shots)[None], qx,
                      torch.arange(e.ways).repeat_interleave(queries)[None], torch.zeros(1, e.ways, dtype=torch.long))
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    assert module.step_weights() == msl_weights(5, 0, config.algorithm.msl_epochs)
    module.training_step(batch, 0).backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for kind in ("features.0.0.weight", "features.0.1.weight", "head.weight", "step_lrs.head/weight"):
        assert grads[f"backbone.{kind}" if not kind.startswith("step_lrs") else kind].abs().sum() > 0, kind


def test_synthetic_presets_and_ablations() -> None:
    full = resolve("synthetic-5w1s", "mamlpp").algorithm
    assert full.msl and full.lslr and full.per_step_bn and full.first_order_epochs > 0 and full.cosine_annealing
    for preset, switch in ABLATIONS.items():
        ablated = resolve("synthetic-5w1s", "mamlpp", preset).algorithm
        differs = [k for k in ("msl", "lslr", "per_step_bn", "first_order_epochs", "cosine_annealing")
                   if getattr(ablated, k) != getattr(full, k)]
        assert differs == [switch] and not getattr(ablated, switch), preset
        assert ablated.source != full.source


def test_metabench_run_mamlpp_writes_a_record(tmp_path: Path) -> None:
    """`metabench run --benchmark synthetic-5w1s --algorithm mamlpp` offline, a few steps, into a temp records
    folder; DA's switch, MSL's last epoch and CA's annealing all happen inside them (2 steps per epoch)."""
    extra = ["algorithm.steps_per_epoch=2", "algorithm.first_order_epochs=1", "algorithm.msl_epochs=1",
             "trainer.cpu_threads=1"]
    args = [sys.executable, "-m", "metabench.cli", "run", "--benchmark", "synthetic-5w1s", "--algorithm", "mamlpp",
            "--max-steps", "4", "--quiet", "--accelerator", "cpu", "--out-dir", str(tmp_path / "runs"),
            "--records-dir", str(tmp_path / "records"), *set_flags([*TINY_RUN, *extra])]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    [path] = (tmp_path / "records").glob("*.json")
    record = read_record(path)
    assert record.algorithm == "mamlpp" and record.preset == "default" and record.training_steps == 4
    assert len(record.scores) == 20 and "random_init_mean" in record.baseline
    algorithm = record.config["algorithm"]
    assert algorithm["msl"] and algorithm["lslr"] and algorithm["per_step_bn"] and algorithm["cosine_annealing"]
    assert algorithm["bn_mode"] == "transductive"


class _Interrupt(Exception):
    pass


def test_resumed_mamlpp_run_matches_the_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run interrupted after its step-4 checkpoint and resumed gives the uninterrupted run's test scores: the
    epoch (MSL, DA) comes from the restored global step, CA's learning rate from the restored scheduler."""
    from metabench.run.runner import run, run_dir_for

    extra = ["algorithm.steps_per_epoch=2", "algorithm.first_order_epochs=1", "algorithm.msl_epochs=2",
             "algorithm.engine=batched"]
    whole = run(tiny_config(tmp_path / "whole", "mamlpp", steps=8, extra=extra), progress=False).record
    config = tiny_config(tmp_path / "parts", "mamlpp", steps=8, extra=extra)
    step = MAMLPlusPlus.training_step

    def interrupted(self: MAMLPlusPlus, batch: MetaBatch, batch_idx: int):
        if self.global_step == 6:  # after the checkpoint of step 4 (TINY_RUN: every 4 steps)
            raise _Interrupt
        return step(self, batch, batch_idx)

    monkeypatch.setattr(MAMLPlusPlus, "training_step", interrupted)
    with pytest.raises(_Interrupt):
        run(config, progress=False)
    checkpoint = run_dir_for(config) / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4 and saved["lr_schedulers"]  # resumed from step 4, with CA's scheduler
    monkeypatch.setattr(MAMLPlusPlus, "training_step", step)
    resumed = run(config, resume=True, progress=False).record
    assert resumed.training_steps == whole.training_steps == 8
    assert resumed.scores == whole.scores
