"""The "batched" and "batched-fused" engines against the "sequential" reference: float64 parity (<= 1e-10) for
every inner-loop feature, an fp32 check on a real protocol shape (<= 1e-4 on the meta-gradient), "batched-fused"
equal to "batched" bit for bit to first order, and the fallback for backbones without a batched forward."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metabench.models.backbones import MLP, Conv4
from metabench.models.inner_loop import (
    BATCHED_ENGINES,
    InnerConfig,
    Params,
    adapt_tasks,
    choose_engine,
    default_engine,
    engine_candidates,
    functional_loss,
    meta_backward,
    meta_loss,
    non_transductive_outputs,
    supports_batched,
    task_outputs,
)
from tests.helpers import DT, WAYS, conv4_image, flat, meta_batch, rel_err, seeded_conv4
from tests.helpers import TASKS as T


def make_conv4(pool: bool, global_pool: bool, dtype: torch.dtype = DT, hidden: int = 6) -> tuple[Conv4, Params]:
    """The shared seeded Conv4, batch-norm affine moved by 0.2 N(0, 1), and its parameter dict."""
    model = seeded_conv4(hidden, pool=pool, global_pool=global_pool, bn_noise=0.2, dtype=dtype)
    return model, dict(model.named_parameters())


def data(model: Conv4, n: int, m: int, steps: int | None = None,
         dtype: torch.dtype = DT) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A meta-batch for ``model``'s input (random labels, drawn set by set from seed 1)."""
    pooled = isinstance(model.features[0][-1], nn.MaxPool2d)
    return meta_batch(n, m, conv4_image(pooled), steps=steps, dtype=dtype, interleave=True)


ARCHS = [(False, False), (False, True), (True, False)]  # Omniglot flatten, Omniglot global pool, mini-ImageNet


@pytest.mark.parametrize("pool,global_pool", ARCHS)
@pytest.mark.parametrize("steps,first_order", [(1, False), (3, False), (2, True)])
@pytest.mark.parametrize("engine", BATCHED_ENGINES)
def test_meta_gradient_parity_float64(pool: bool, global_pool: bool, steps: int, first_order: bool,
                                      engine: str) -> None:
    model, params = make_conv4(pool, global_pool)
    sx, sy, qx, qy = data(model, 5, 4)
    config = InnerConfig(steps=steps, lr=0.3, first_order=first_order)
    results = {}
    for name in ("sequential", engine):
        loss, outputs = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, config, name)
        results[name] = (loss, outputs, torch.autograd.grad(loss, list(params.values())))
    (l_ref, o_ref, g_ref), (l_b, o_b, g_b) = results["sequential"], results[engine]
    assert abs(float(l_b.detach() - l_ref.detach())) <= 1e-12 * abs(float(l_ref.detach()))
    assert rel_err(o_b, o_ref) <= 1e-10
    assert rel_err(list(g_b), list(g_ref)) <= 1e-10
    scale = flat(g_ref).norm()
    for a, b in zip(g_b, g_ref):  # each parameter too (conv biases before batch norm have ~0 gradients)
        assert (a - b).norm() <= 1e-10 * max(float(b.norm()), float(scale))


def test_second_order_differs_from_first_order() -> None:
    """Guard against the batched engine silently detaching: MAML and FOMAML meta-gradients must differ."""
    model, params = make_conv4(False, False)
    sx, sy, qx, qy = data(model, 5, 4)
    grads = []
    for first_order in (False, True):
        loss, _ = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy,
                            InnerConfig(steps=1, lr=0.3, first_order=first_order), "batched")
        grads.append(torch.autograd.grad(loss, list(params.values())))
    assert rel_err(list(grads[0]), list(grads[1])) > 1e-3


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("engine", BATCHED_ENGINES)
def test_reptile_adam_per_step_minibatches_parity_float64(first_order: bool, engine: str) -> None:
    model, params = make_conv4(False, True)
    steps = 3
    sx, sy, _, _ = data(model, 4, 1, steps=steps)
    config = InnerConfig(steps=steps, lr=0.01, first_order=first_order, optimizer="adam", per_step_batches=True)
    task_loss = functional_loss(model, F.cross_entropy)
    ref = adapt_tasks(params, task_loss, sx, sy, config, "sequential")
    ours = adapt_tasks(params, task_loss, sx, sy, config, engine)
    # A conv bias right before batch norm has a mathematically zero gradient; Adam normalises its rounding
    # noise (~1e-16 / eps), so those entries only have to stay put in both engines.
    null = [k for k in params if k.startswith("features.") and k.endswith(".0.bias")]
    for name in params:
        assert ours[name].shape == (T, *params[name].shape)
        if name in null:
            for adapted in (ours, ref):
                assert (adapted[name] - params[name]).abs().max() <= 1e-6
        else:
            assert rel_err(ours[name], ref[name]) <= 1e-10, name
    # and the outer gradient through the adapted parameters (second-order Adam when not first_order)
    gen = torch.Generator().manual_seed(3)
    probe = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in ref.items() if k not in null}
    g_ref = torch.autograd.grad(sum((ref[k] * probe[k]).sum() for k in probe), list(params.values()),
                                allow_unused=True, materialize_grads=True)
    g_ours = torch.autograd.grad(sum((ours[k] * probe[k]).sum() for k in probe), list(params.values()),
                                 allow_unused=True, materialize_grads=True)
    keep = [i for i, k in enumerate(params) if k not in null]
    assert rel_err([g_ours[i] for i in keep], [g_ref[i] for i in keep]) <= 1e-10


@pytest.mark.parametrize("pool,global_pool", ARCHS)
@pytest.mark.parametrize("engine", BATCHED_ENGINES)
def test_evaluation_outputs_parity_float64(pool: bool, global_pool: bool, engine: str) -> None:
    model, params = make_conv4(pool, global_pool)
    sx, sy, qx, _ = data(model, 5, 3)
    detached = {k: v.detach() for k, v in params.items()}
    task_loss = functional_loss(model, F.cross_entropy)
    config = InnerConfig(steps=2, lr=0.3, first_order=True)
    adapted = {k: v.detach() for k, v in adapt_tasks(detached, task_loss, sx, sy, config, "sequential").items()}
    adapted_b = adapt_tasks(detached, task_loss, sx, sy, config, engine)
    for k in adapted:
        assert rel_err(adapted_b[k], adapted[k]) <= 1e-10
    with torch.no_grad():
        for fn, args in ((task_outputs, (qx,)), (non_transductive_outputs, (sx, qx))):
            ref = fn(model, adapted, *args, engine="sequential")
            ours = fn(model, adapted, *args, engine=engine)
            assert ours.shape == ref.shape == (T, qx.shape[1], WAYS)
            assert rel_err(ours, ref) <= 1e-10, fn.__name__


def test_zero_steps_returns_stacked_copies() -> None:
    model, params = make_conv4(False, False)
    sx, sy, _, _ = data(model, 5, 1)
    out = adapt_tasks(params, functional_loss(model, F.cross_entropy), sx, sy, InnerConfig(steps=0, lr=0.1), "batched")
    for k, p in params.items():
        assert out[k].shape == (T, *p.shape) and out[k].is_contiguous()
        assert torch.equal(out[k][1], p.detach())


@pytest.mark.parametrize("engine", BATCHED_ENGINES)
def test_fp32_parity_on_omniglot_protocol_shape(engine: str) -> None:
    """Real Omniglot 5w1s MAML shape (64 filters, global pool, scaled inner loss 5x, step 0.4), fp32, 4 tasks."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Conv4(1, 5, 28, hidden=64, global_pool=True)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(4, 5, 1, 28, 28, generator=gen), torch.rand(4, 5, 1, 28, 28, generator=gen)
    sy = qy = torch.arange(5).repeat(4, 1)
    loss_fn = lambda out, y: F.cross_entropy(out, y) * 5.0  # noqa: E731 - the preset's inner_loss_scale
    config = InnerConfig(steps=1, lr=0.4)
    grads = {}
    for name in ("sequential", engine):
        loss, _ = meta_loss(model, params, loss_fn, sx, sy, qx, qy, config, name)
        grads[name] = torch.autograd.grad(loss, list(params.values()))
    assert rel_err(list(grads[engine]), list(grads["sequential"])) <= 1e-4


@pytest.mark.parametrize("pool", [False, True])
def test_fused_engine_is_batched_bit_for_bit_to_first_order(pool: bool) -> None:
    """"batched-fused" changes only how second derivatives are computed: FOMAML's meta-gradient, Reptile's adapted
    weights, evaluation outputs and the inner gradients' values (the adapted weights of a second-order MAML step)
    are those of "batched" exactly (fp32, the protocol's 64 filters)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Conv4(3 if pool else 1, 5, 84 if pool else 28, hidden=16, pool=pool)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    size = (3, 84, 84) if pool else (1, 28, 28)
    sx, qx = torch.rand(4, 5, *size, generator=gen), torch.rand(4, 5, *size, generator=gen)
    sy = qy = torch.arange(5).repeat(4, 1)
    task_loss = functional_loss(model, F.cross_entropy)
    results: dict[str, list[Tensor]] = {}
    for engine in BATCHED_ENGINES:
        fomaml, _ = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, InnerConfig(2, 0.4, True), engine)
        adam = InnerConfig(2, 1e-3, first_order=True, optimizer="adam")
        reptile = adapt_tasks(params, task_loss, sx, sy, adam, engine)
        maml = adapt_tasks(params, task_loss, sx, sy, InnerConfig(1, 0.4), engine)
        results[engine] = [*torch.autograd.grad(fomaml, list(params.values())), *reptile.values(), *maml.values(),
                           task_outputs(model, maml, qx, engine)]
    assert all(torch.equal(a, b) for a, b in zip(*results.values()))


class _NoBatched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3, dtype=DT)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def test_backbone_without_batched_forward_falls_back_to_sequential() -> None:
    model = _NoBatched()
    assert not supports_batched(model) and supports_batched(Conv4(1, 5, 28, hidden=2))
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(T, 6, 4, generator=gen, dtype=DT), torch.randn(T, 2, 4, generator=gen, dtype=DT)
    ys, yq = torch.randint(0, 3, (T, 6), generator=gen), torch.randint(0, 3, (T, 2), generator=gen)
    config = InnerConfig(steps=2, lr=0.1)
    ref, _ = meta_loss(model, params, F.cross_entropy, xs, ys, xq, yq, config, "sequential")
    ours, _ = meta_loss(model, params, F.cross_entropy, xs, ys, xq, yq, config, "batched")
    assert torch.equal(ours, ref)
    with torch.no_grad():
        adapted = adapt_tasks(params, functional_loss(model, F.cross_entropy), xs, ys, config, "batched")
        assert non_transductive_outputs(model, adapted, xs, xq, "batched").shape == (T, 2, 3)
    # a plain closure (not made by functional_loss) also falls back
    closure = lambda p, x, y: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)  # noqa: E731
    a = adapt_tasks(params, closure, xs, ys, config, "batched")
    b = adapt_tasks(params, closure, xs, ys, config, "sequential")
    assert all(torch.equal(a[k], b[k]) for k in params)


def test_default_engine_is_a_known_engine() -> None:
    assert default_engine("cpu") in ("batched", "sequential", "vmap")
    assert default_engine(torch.device("cuda", 0)) in ("batched", "sequential", "vmap")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("engine", [*BATCHED_ENGINES, "vmap"])
def test_cuda_parity_against_cpu_sequential(engine: str) -> None:
    """float64 second-order meta-gradient on CUDA (<= 1e-10 vs the CPU sequential reference)."""
    model, params = make_conv4(False, True)
    sx, sy, qx, qy = data(model, 5, 4)
    config = InnerConfig(steps=2, lr=0.3)
    loss, _ = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, config, "sequential")
    ref = torch.autograd.grad(loss, list(params.values()))
    model.cuda()
    cuda_params = dict(model.named_parameters())
    loss, _ = meta_loss(model, cuda_params, F.cross_entropy, sx.cuda(), sy.cuda(), qx.cuda(), qy.cuda(), config, engine)
    ours = [g.cpu() for g in torch.autograd.grad(loss, list(cuda_params.values()))]
    assert rel_err(ours, list(ref)) <= 1e-10


def test_engine_candidates_per_device() -> None:
    model, _ = make_conv4(False, True)
    assert engine_candidates("cpu", model) == ("batched-fused", "batched", "sequential")
    assert engine_candidates("cuda", model) == ("vmap", "batched-fused", "batched")
    # a batched forward without a fused one (the MLP): "batched-fused" would run the same code, so it is no candidate
    assert engine_candidates("cpu", MLP(1, 5, 28)) == ("batched", "sequential")
    assert engine_candidates("cpu", nn.Linear(2, 2)) == ("sequential",)  # no batched_forward


def test_choose_engine_keeps_the_fastest_and_only_calls_run() -> None:
    cost = {"batched": 0.03, "sequential": 0.0, "vmap": 0.06}
    calls: list[str] = []

    def run(engine: str) -> None:
        calls.append(engine)
        time.sleep(cost[engine])

    engine, seconds = choose_engine(run, ("batched", "sequential", "vmap"), "cpu", repeats=2)
    assert engine == "sequential"
    assert calls == ["batched"] * 2 + ["sequential"] * 2 + ["vmap"] * 2
    assert seconds["batched"] >= 0.03 and seconds["vmap"] >= 0.06 and seconds["sequential"] < 0.03
    assert choose_engine(run, ("vmap",), "cpu") == ("vmap", {})  # one candidate: nothing is run
    assert len(calls) == 6
    with pytest.raises(ValueError, match="unknown engine"):
        choose_engine(run, ("fast", "sequential"), "cpu")
    with pytest.raises(ValueError, match="at least one"):
        choose_engine(run, (), "cpu")


def test_choose_engine_on_a_real_meta_gradient_has_no_side_effects() -> None:
    model, params = make_conv4(False, True, dtype=torch.float32)
    sx, sy, qx, qy = data(model, 5, 5, dtype=torch.float32)
    config = InnerConfig(1, 0.4)
    before = {k: v.detach().clone() for k, v in params.items()}

    def run(engine: str) -> None:  # what MetaLearner's "auto" probe does: meta-gradient, discarded
        loss, _ = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, config, engine)
        torch.autograd.grad(loss, list(params.values()))

    engine, seconds = choose_engine(run, engine_candidates("cpu", model), "cpu")
    assert engine in engine_candidates("cpu", model) and set(seconds) == set(engine_candidates("cpu", model))
    assert all(p.grad is None for p in params.values())
    assert all(torch.equal(before[k], v) for k, v in params.items())


@pytest.mark.parametrize("engine", ["batched", "sequential"])
@pytest.mark.parametrize("first_order", [False, True])
def test_chunked_meta_backward_equals_unchunked_float64(engine: str, first_order: bool) -> None:
    model, params = make_conv4(False, True)
    sx, sy, qx, qy = data(model, 5, 4)
    config = InnerConfig(steps=2, lr=0.3, first_order=first_order)
    loss, out = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, config, engine)
    ref = torch.autograd.grad(loss, list(params.values()))
    for chunk in (1, 2, None):  # T = 3: uneven chunks (2 + 1) weigh by their size
        model.zero_grad(set_to_none=True)
        chunked, chunked_out = meta_backward(model, params, F.cross_entropy, sx, sy, qx, qy, config, engine, chunk)
        assert not chunked.requires_grad
        assert abs(float(chunked) - float(loss.detach())) <= 1e-12
        assert torch.allclose(chunked_out, out.detach(), rtol=0, atol=1e-12)
        assert rel_err([p.grad for p in params.values()], list(ref)) <= 1e-10
    with pytest.raises(ValueError, match="task_chunk"):
        meta_backward(model, params, F.cross_entropy, sx, sy, qx, qy, config, engine, 0)


def test_batched_engine_adapting_a_subset_matches_sequential() -> None:
    """``algorithm.adapt`` (e.g. the head only) hands the inner loop a subset of the parameters; the batched
    engine completes it with the module's own (frozen, shared) parameters, gives the sequential gradients, and
    MAML's gradient still reaches the frozen ones through the query loss."""
    model, _ = make_conv4(pool=False, global_pool=False)
    sx, sy, qx, qy = data(model, 5, 10)
    grads = {}
    for engine in ("sequential", "batched"):
        model.zero_grad()
        head = {k: p for k, p in model.named_parameters() if k.startswith("head.")}
        assert supports_batched(model, head) and supports_batched(model, dict(model.named_parameters()))
        assert not supports_batched(model, {"not.a.parameter": head["head.bias"]})
        loss, _ = meta_loss(model, head, F.cross_entropy, sx, sy, qx, qy, InnerConfig(2, 0.4), engine)
        loss.backward()
        grads[engine] = [p.grad.clone() for p in model.parameters()]
    assert rel_err(grads["batched"], grads["sequential"]) <= 1e-10
    assert grads["batched"][0].abs().sum() > 0  # the first conv (not adapted) is still meta-trained
