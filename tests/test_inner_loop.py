"""The functional inner loop against independent references, in float64.

References are written here with plain ``torch.autograd.grad`` loops, closed-form gradients derived by hand,
or ``torch.optim.Adam``; none of them call ``metabench.models.inner_loop``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metabench.models.backbones import Conv4
from metabench.models.inner_loop import (
    InnerConfig,
    Params,
    adapt,
    adapt_tasks,
    default_engine,
    functional_loss,
    meta_loss,
    non_transductive_outputs,
    reptile_update,
    task_outputs,
)
from tests.helpers import DT, WAYS, conv4_image, flat, meta_batch, reference_maml_grad, rel_err, seeded_conv4
from tests.helpers import TASKS as T

ENGINES = ["vmap", "sequential"]


# ------------------------------------------------------------------------------------------------ Conv4 fixtures

QUERIES = 2  # 3 tasks, 5-way 1-shot, 2 queries per class


@pytest.fixture(scope="module")
def conv4() -> tuple[nn.Module, Params, Tensor, Tensor, Tensor, Tensor]:
    """A small float64 Omniglot-style Conv4 (28x28, stride 2, hidden 8) WITH batch norm, and a meta-batch."""
    gen = torch.Generator().manual_seed(0)
    # batch norm gets non-trivial affine parameters so that their gradients are exercised too
    model = seeded_conv4(8, bn_noise=0.1, generator=gen)
    sx, sy, qx, qy = meta_batch(WAYS, WAYS * QUERIES, conv4_image(False), seed=gen, support_labels="ordered",
                                query_labels="ordered")
    return model, dict(model.named_parameters()), sx, sy, qx, qy


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("engine", ENGINES)
def test_maml_conv4_meta_gradient_matches_sequential_autograd(conv4, steps: int, engine: str) -> None:
    model, params, sx, sy, qx, qy = conv4
    config = InnerConfig(steps=steps, lr=0.4)
    loss, logits = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, config, engine)
    assert logits.shape == (T, WAYS * QUERIES, WAYS) and not logits.requires_grad
    ours = flat(torch.autograd.grad(loss, list(params.values())))
    ref = reference_maml_grad(model, params, sx, sy, qx, qy, 0.4, steps, first_order=False)
    assert rel_err(ours, ref) <= 1e-10
    # and it really is second order: the first-order gradient differs
    fo = reference_maml_grad(model, params, sx, sy, qx, qy, 0.4, steps, first_order=True)
    assert rel_err(fo, ref) > 1e-4


@pytest.mark.parametrize("engine", ENGINES)
def test_fomaml_conv4_is_query_gradient_at_adapted_params(conv4, engine: str) -> None:
    model, params, sx, sy, qx, qy = conv4
    config = InnerConfig(steps=2, lr=0.4, first_order=True)
    loss, _ = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, config, engine)
    ours = flat(torch.autograd.grad(loss, list(params.values())))
    ref = reference_maml_grad(model, params, sx, sy, qx, qy, 0.4, 2, first_order=True)
    assert rel_err(ours, ref) <= 1e-10


def test_native_batchnorm_under_vmap_is_not_exact(conv4) -> None:
    """Why backbones.BatchNorm2d exists: vmap over nn.BatchNorm2d gives wrong second-order gradients.

    If this starts failing, torch fixed vmap + F.batch_norm double backward; the plain-ops batch norm
    would then be optional (keep it anyway: it has no buffers).
    """
    model, params, sx, sy, qx, qy = conv4
    native = Conv4(1, WAYS, 28, hidden=8).to(DT)
    for block in native.features[:4]:
        block[1] = nn.BatchNorm2d(8, track_running_stats=False).to(DT)  # batch statistics, no buffers
    native.load_state_dict(model.state_dict())
    native_params = dict(native.named_parameters())
    config = InnerConfig(steps=1, lr=0.4)
    ref = reference_maml_grad(native, native_params, sx, sy, qx, qy, 0.4, 1, first_order=False)
    loss, _ = meta_loss(native, native_params, F.cross_entropy, sx, sy, qx, qy, config, "vmap")
    vmapped = flat(torch.autograd.grad(loss, list(native_params.values())))
    # the same reference matches our plain-ops batch norm to 1e-10 (test above); native is off by ~1e-2
    assert rel_err(vmapped, ref) > 1e-6


# -------------------------------------------------------------------------- one linear layer, gradients by hand
#
# Model f(X) = X w (nn.Linear(d, 1, bias=False), weight stored as a row [1, d]); task loss
#     L(w) = 0.5 ||X w - y||^2 / n,           grad L(w) = X^T (X w - y) / n.
# One SGD step:  w' = w - a X^T (X w - y) / n = A w + a X^T y / n,   with A = I - a X^T X / n (symmetric).
# So dw'/dw = A and the meta-gradient of the query loss Lq(w') = 0.5 ||Xq w' - yq||^2 / nq is
#     d Lq(w') / dw = A Xq^T (Xq w' - yq) / nq.
# Two steps: w'' = A w' + a X^T y / n, dw''/dw = A A, meta-gradient A^2 Xq^T (Xq w'' - yq) / nq.
# First order drops A (treats it as I): meta-gradient Xq^T (Xq w^(k) - yq) / nq.
# Over T tasks the meta-loss is the mean of the task query losses, so the meta-gradient is the mean.


def half_mse(pred: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (pred.squeeze(-1) - y).square().mean()


def linear_problem(tasks: int = 3, d: int = 4, n: int = 6, nq: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).to(DT)
    w = torch.randn(1, d, generator=gen, dtype=DT)
    params = {"weight": w.clone().requires_grad_()}
    xs = torch.randn(tasks, n, d, generator=gen, dtype=DT)
    ys = torch.randn(tasks, n, generator=gen, dtype=DT)
    xq = torch.randn(tasks, nq, d, generator=gen, dtype=DT)
    yq = torch.randn(tasks, nq, generator=gen, dtype=DT)
    return model, params, w[0], xs, ys, xq, yq


def hand_meta_grad(w: Tensor, xs, ys, xq, yq, a: float, steps: int, first_order: bool) -> Tensor:
    d = w.shape[0]
    total = torch.zeros(d, dtype=DT)
    for X, y, Xq, yq_ in zip(xs, ys, xq, yq):
        n, nq = X.shape[0], Xq.shape[0]
        A = torch.eye(d, dtype=DT) - a * X.T @ X / n
        wk = w.clone()
        for _ in range(steps):
            wk = wk - a * X.T @ (X @ wk - y) / n
        jac = torch.eye(d, dtype=DT) if first_order else torch.linalg.matrix_power(A, steps)
        total += jac @ Xq.T @ (Xq @ wk - yq_) / nq
    return total / xs.shape[0]


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("engine", ENGINES)
def test_linear_meta_gradient_closed_form(steps: int, first_order: bool, engine: str) -> None:
    model, params, w, xs, ys, xq, yq = linear_problem()
    a = 0.3
    config = InnerConfig(steps=steps, lr=a, first_order=first_order)
    loss, _ = meta_loss(model, params, half_mse, xs, ys, xq, yq, config, engine)
    (ours,) = torch.autograd.grad(loss, [params["weight"]])
    expected = hand_meta_grad(w, xs, ys, xq, yq, a, steps, first_order)
    torch.testing.assert_close(ours[0], expected, rtol=1e-12, atol=1e-12)
    if not first_order:  # the second-order terms are really there
        assert rel_err(hand_meta_grad(w, xs, ys, xq, yq, a, steps, True), expected) > 1e-3


def test_adapt_is_pure_and_zero_steps_is_identity() -> None:
    model, params, w, xs, ys, _, _ = linear_problem()
    before = params["weight"].detach().clone()
    task_loss = functional_loss(model, half_mse)
    out = adapt(params, task_loss, xs[0], ys[0], InnerConfig(steps=3, lr=0.1))
    assert torch.equal(params["weight"].detach(), before) and out["weight"] is not params["weight"]
    for engine in ENGINES:
        same = adapt_tasks(params, task_loss, xs, ys, InnerConfig(steps=0, lr=0.1), engine)
        assert same["weight"].shape == (xs.shape[0], 1, 4)
        assert torch.equal(same["weight"].detach(), before.expand(xs.shape[0], 1, 4))


def test_first_order_builds_no_graph_through_inner_gradients() -> None:
    model, params, *_, xs, ys, _, _ = linear_problem()
    task_loss = functional_loss(model, half_mse)
    out = adapt(params, task_loss, xs[0], ys[0], InnerConfig(steps=2, lr=0.1, first_order=True))
    # d(adapted)/d(params) is exactly the identity for first-order SGD
    (jac_vec,) = torch.autograd.grad(out["weight"].sum(), [params["weight"]])
    assert torch.equal(jac_vec, torch.ones_like(jac_vec))


# --------------------------------------------------------------------------------------------------------- Adam


def test_adam_beta1_zero_matches_hand_computation_and_torch_optim() -> None:
    model, params, w, xs, ys, _, _ = linear_problem(tasks=1, d=3, n=4)
    X, y = xs[0], ys[0]
    lr, beta2, eps, steps = 0.05, 0.999, 1e-8, 3
    config = InnerConfig(steps=steps, lr=lr, optimizer="adam", first_order=True)
    ours = adapt(params, functional_loss(model, half_mse), X, y, config)["weight"][0].detach()

    # by hand (numpy): with beta1 = 0 the first moment is the gradient itself
    Xn, yn, wn, v = X.numpy(), y.numpy(), w.numpy().copy(), np.zeros(3)
    for t in range(1, steps + 1):
        g = Xn.T @ (Xn @ wn - yn) / len(yn)
        v = beta2 * v + (1 - beta2) * g * g
        wn = wn - lr * g / (np.sqrt(v / (1 - beta2**t)) + eps)
    np.testing.assert_allclose(ours.numpy(), wn, rtol=1e-12, atol=1e-14)

    # and torch.optim.Adam with betas (0, 0.999)
    layer = nn.Linear(3, 1, bias=False).to(DT)
    with torch.no_grad():
        layer.weight.copy_(w[None])
    opt = torch.optim.Adam(layer.parameters(), lr=lr, betas=(0.0, beta2), eps=eps)
    for _ in range(steps):
        opt.zero_grad()
        half_mse(layer(X), y).backward()
        opt.step()
    torch.testing.assert_close(ours, layer.weight.detach()[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("engine", ENGINES)
def test_second_order_adam_matches_finite_differences_with_a_dead_feature(engine: str) -> None:
    """A zero input feature has an exactly-zero gradient: second-order Adam must stay finite there."""
    model, params, w, xs, ys, xq, yq = linear_problem(tasks=2, d=3, n=4, nq=3)
    xs = xs.clone()
    xs[:, :, 2] = 0.0  # feature 2 is dead in the support sets
    config = InnerConfig(steps=2, lr=0.05, optimizer="adam")
    loss, _ = meta_loss(model, params, half_mse, xs, ys, xq, yq, config, engine)
    (ours,) = torch.autograd.grad(loss, [params["weight"]])
    assert torch.isfinite(ours).all()

    def meta(wv: Tensor) -> float:
        value, _ = meta_loss(model, {"weight": wv[None]}, half_mse, xs, ys, xq, yq, config, "sequential")
        return float(value)

    h = 1e-6
    fd = torch.stack([torch.tensor((meta(w + h * e) - meta(w - h * e)) / (2 * h), dtype=DT)
                      for e in torch.eye(3, dtype=DT)])
    torch.testing.assert_close(ours[0], fd, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------------ Reptile


def test_reptile_update_by_hand() -> None:
    params = {"w": torch.tensor([1.0, -2.0], dtype=DT), "b": torch.tensor(0.5, dtype=DT)}
    adapted = {"w": torch.tensor([[2.0, 0.0], [4.0, -4.0], [0.0, -2.0]], dtype=DT),  # mean [2, -2]
               "b": torch.tensor([1.0, 0.0, 2.0], dtype=DT)}  # mean 1
    new = reptile_update(params, adapted, epsilon=0.25)
    # w + 0.25 * ([2, -2] - [1, -2]) = [1.25, -2];  b + 0.25 * (1 - 0.5) = 0.625
    torch.testing.assert_close(new["w"], torch.tensor([1.25, -2.0], dtype=DT), rtol=0, atol=1e-15)
    torch.testing.assert_close(new["b"], torch.tensor(0.625, dtype=DT), rtol=0, atol=1e-15)
    assert not new["w"].requires_grad


@pytest.mark.parametrize("engine", ENGINES)
def test_reptile_with_sgd_inner_loop_by_hand(engine: str) -> None:
    model, params, w, xs, ys, _, _ = linear_problem(tasks=4)
    a, k, eps = 0.1, 3, 0.5
    adapted = adapt_tasks(params, functional_loss(model, half_mse), xs, ys,
                          InnerConfig(steps=k, lr=a, first_order=True), engine)
    new = reptile_update(params, adapted, eps)["weight"][0]
    ends = []
    for X, y in zip(xs, ys):
        wk = w.clone()
        for _ in range(k):
            wk = wk - a * X.T @ (X @ wk - y) / X.shape[0]
        ends.append(wk)
    expected = w + eps * (torch.stack(ends).mean(0) - w)
    torch.testing.assert_close(new, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------- outputs and evaluation


@pytest.mark.parametrize("engine", ENGINES)
def test_task_outputs_and_non_transductive_outputs_match_plain_loops(conv4, engine: str) -> None:
    model, params, sx, sy, qx, _ = conv4
    adapted = adapt_tasks(params, functional_loss(model, F.cross_entropy), sx, sy,
                          InnerConfig(steps=1, lr=0.4), engine)
    adapted = {k: v.detach() for k, v in adapted.items()}
    per_task = [{k: v[t] for k, v in adapted.items()} for t in range(T)]

    transductive = task_outputs(model, adapted, qx, engine)
    expected = torch.stack([functional_call(model, per_task[t], (qx[t],)) for t in range(T)])
    torch.testing.assert_close(transductive, expected, rtol=1e-12, atol=1e-12)

    ours = non_transductive_outputs(model, adapted, sx, qx, engine)
    loop = torch.empty(T, qx.shape[1], WAYS, dtype=DT)
    for t in range(T):
        for j in range(qx.shape[1]):
            batch = torch.cat([sx[t], qx[t, j:j + 1]])  # support set + this one query example
            loop[t, j] = functional_call(model, per_task[t], (batch,))[-1]
    torch.testing.assert_close(ours, loop, rtol=1e-12, atol=1e-12)
    # batch statistics differ from the transductive ones, so the outputs do too
    assert not torch.allclose(ours, transductive, atol=1e-6)


def test_bad_engine_and_optimizer_raise() -> None:
    model, params, *_, xs, ys, xq, yq = linear_problem()
    with pytest.raises(ValueError, match="unknown engine 'jit'"):
        meta_loss(model, params, half_mse, xs, ys, xq, yq, InnerConfig(steps=1, lr=0.1), "jit")
    with pytest.raises(ValueError, match="unknown inner optimizer 'rmsprop'"):
        InnerConfig(steps=1, lr=0.1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="steps"):
        InnerConfig(steps=-1, lr=0.1)


def test_default_engine() -> None:
    assert default_engine(torch.device("cpu")) == "sequential"
    assert default_engine(torch.device("cuda", 0)) == "vmap"


def test_per_step_batches_use_one_minibatch_per_step() -> None:
    """Reptile's inner minibatches: step i sees only x[i]; equal to chaining single-step adaptations."""
    from metabench.models.inner_loop import InnerConfig, adapt, functional_loss

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = functional_loss(model, torch.nn.functional.cross_entropy)
    xs, ys = torch.randn(4, 5, 3, dtype=torch.float64), torch.randint(0, 2, (4, 5))
    batched = adapt(params, loss, xs, ys, InnerConfig(4, 0.5, True, per_step_batches=True))
    chained = params
    for i in range(4):
        chained = adapt(chained, loss, xs[i], ys[i], InnerConfig(1, 0.5, True))
    for k in params:
        torch.testing.assert_close(batched[k], chained[k], rtol=0, atol=1e-14)
