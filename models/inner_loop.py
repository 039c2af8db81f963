"""The one functional inner loop shared by every algorithm (MAML, FOMAML, Reptile).

Parameters travel as plain dicts (``Params``); the backbone is run through ``torch.func.functional_call``.
``adapt`` adapts ONE task and is a pure function ``params -> adapted params``; ``adapt_tasks`` maps it over a
meta-batch either with ``torch.func.vmap`` ("vmap") or with a Python loop ("sequential"). Inner gradients
come from ``torch.func.grad``; with ``first_order=False`` the adapted parameters stay differentiable w.r.t.
the incoming ones by ordinary outer autograd, so ``meta_loss(...).backward()`` is second-order MAML.
Backbones must be buffer-free (see ``metabench.models.backbones.BatchNorm2d``) for vmap to be exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Params = dict[str, Tensor]
TaskLoss = Callable[[Params, Tensor, Tensor], Tensor]  # (params, x, y) -> scalar loss of ONE task
ENGINES = ("vmap", "sequential")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class InnerConfig:
    """Inner-loop hyper-parameters.

    Attributes:
        steps: number of gradient steps per task.
        lr: inner step size (alpha for SGD; the Adam learning rate for "adam").
        first_order: detach inner gradients (FOMAML / Reptile); no second-order terms reach ``params``.
        optimizer: "sgd" or "adam" (Adam with beta1 = 0 by default, as in Reptile, Nichol et al. 2018;
            fresh state for every task).
        adam_betas, adam_eps: Adam's (beta1, beta2) and epsilon.
        per_step_batches: ``x``/``y`` carry a leading ``steps`` dim and step ``i`` uses ``x[i]``, ``y[i]``
            (Reptile's inner minibatches: fresh data at every step, which is where its meta-signal comes from).
    """

    steps: int
    lr: float
    first_order: bool = False
    optimizer: str = "sgd"
    adam_betas: tuple[float, float] = (0.0, 0.999)
    adam_eps: float = 1e-8
    per_step_batches: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"InnerConfig.steps must be >= 0, got {self.steps}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")


def functional_loss(model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor]) -> TaskLoss:
    """Turn ``model`` and an output loss into a :data:`TaskLoss` of explicit parameters."""

    def task_loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss(functional_call(model, params, (x,)), y)

    return task_loss


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) derivative at 0: second-order Adam would otherwise give inf * 0."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def adapt(params: Params, task_loss: TaskLoss, x: Tensor, y: Tensor, config: InnerConfig) -> Params:
    """Adapt ``params`` to ONE task (support ``x``, ``y``) with ``config.steps`` gradient steps.

    Pure: returns new tensors, never touches ``params``. With ``first_order=False`` the result is
    differentiable w.r.t. ``params`` through every inner step; with ``first_order=True`` the inner
    gradients are constants, so d(adapted)/d(params) is the identity (for SGD).
    """
    grad_fn = grad(task_loss)
    beta1, beta2 = config.adam_betas
    m = {k: torch.zeros_like(p) for k, p in params.items()} if config.optimizer == "adam" else {}
    v = {k: torch.zeros_like(p) for k, p in params.items()} if config.optimizer == "adam" else {}
    for step in range(1, config.steps + 1):
        xi, yi = (x[step - 1], y[step - 1]) if config.per_step_batches else (x, y)
        if config.first_order:
            with torch.no_grad():  # torch.func.grad still differentiates inside; the OUTER graph is not built
                grads = grad_fn(params, xi, yi)
        else:
            grads = grad_fn(params, xi, yi)
        if config.optimizer == "sgd":
            params = {k: p - config.lr * grads[k] for k, p in params.items()}
            continue
        new_params = {}
        for k, p in params.items():
            g = grads[k]
            m[k] = beta1 * m[k] + (1.0 - beta1) * g
            v[k] = beta2 * v[k] + (1.0 - beta2) * g * g
            m_hat = m[k] / (1.0 - beta1**step)
            v_hat = v[k] / (1.0 - beta2**step)
            new_params[k] = p - config.lr * m_hat / (_safe_sqrt(v_hat) + config.adam_eps)
        params = new_params
    return params


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")


def adapt_tasks(params: Params, task_loss: TaskLoss, xs: Tensor, ys: Tensor, config: InnerConfig,
                engine: str = "vmap") -> Params:
    """Adapt ``params`` to each task of a meta-batch: ``xs [T, n, ...]``, ``ys [T, n, ...]``.

    Returns adapted parameters with a leading task dim ``[T, *shape]``.
    """
    _check_engine(engine)
    if engine == "vmap":
        return vmap(adapt, in_dims=(None, None, 0, 0, None))(params, task_loss, xs, ys, config)
    per_task = [adapt(params, task_loss, x, y, config) for x, y in zip(xs, ys)]
    return {k: torch.stack([p[k] for p in per_task]) for k in params}


def task_outputs(model: nn.Module, adapted: Params, xs: Tensor, engine: str = "vmap") -> Tensor:
    """Outputs of ``model`` on ``xs [T, m, ...]`` with each task's adapted parameters -> ``[T, m, ...]``."""
    _check_engine(engine)

    def forward(params: Params, x: Tensor) -> Tensor:
        return functional_call(model, params, (x,))

    if engine == "vmap":
        return vmap(forward)(adapted, xs)
    return torch.stack([forward({k: p[t] for k, p in adapted.items()}, x) for t, x in enumerate(xs)])


def meta_loss(model: nn.Module, params: Params, task_loss_fn: Callable[[Tensor, Tensor], Tensor],
              support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, config: InnerConfig,
              engine: str = "vmap") -> tuple[Tensor, Tensor]:
    """MAML's objective (FOMAML's with ``config.first_order``): mean over tasks of the query loss after adapting.

    ``task_loss_fn(outputs, targets)`` is the per-task loss (e.g. ``F.cross_entropy``), used both for the
    inner steps on the support set and for the query loss. Returns ``(loss, query_outputs)``: a scalar
    differentiable w.r.t. ``params`` and the detached query outputs ``[T, m, ways]``.
    """
    adapted = adapt_tasks(params, functional_loss(model, task_loss_fn), support_x, support_y, config, engine)
    outputs = task_outputs(model, adapted, query_x, engine)
    if engine == "vmap":
        losses = vmap(task_loss_fn)(outputs, query_y)
    else:
        losses = torch.stack([task_loss_fn(o, y) for o, y in zip(outputs, query_y)])
    return losses.mean(), outputs.detach()


@torch.no_grad()
def reptile_update(params: Params, adapted: Params, epsilon: float) -> Params:
    """Reptile's outer step: ``theta + epsilon * (mean_over_tasks(adapted) - theta)`` (no autograd)."""
    return {k: p + epsilon * (adapted[k].mean(dim=0) - p) for k, p in params.items()}


def default_engine(device: torch.device | str) -> str:
    """The faster engine for ``device``: "vmap" on CUDA, "sequential" on CPU.

    Measured on Conv4-omniglot, 5-way 1-shot, 15 queries per class, meta-batch 32, 1 second-order step,
    float32, one forward+backward: H100 vmap 40 ms vs sequential 750 ms; 2-core CPU (1 thread, CPU time)
    sequential 2.7 s vs vmap 5.0 s (vmap runs the per-task convs as one grouped conv, probably slower on CPU).
    """
    return "vmap" if torch.device(device).type == "cuda" else "sequential"


def non_transductive_outputs(model: nn.Module, adapted: Params, support_x: Tensor, query_x: Tensor,
                             engine: str = "vmap") -> Tensor:
    """Non-transductive evaluation (Reptile paper): each query example is classified in its own batch,
    together with its task's support set, so batch-norm statistics come from support + that one example.

    ``adapted`` has a task dim; ``support_x [T, n, ...]``, ``query_x [T, m, ...]`` -> outputs ``[T, m, ...]``.
    The query examples are vectorised with vmap; ``engine`` picks how tasks are mapped.
    """
    _check_engine(engine)

    def one_query(params: Params, support: Tensor, query: Tensor) -> Tensor:
        batch = torch.cat([support, query.unsqueeze(0)])
        return functional_call(model, params, (batch,))[-1]

    per_task = vmap(one_query, in_dims=(None, None, 0))  # over the m query examples of one task
    if engine == "vmap":
        return vmap(per_task)(adapted, support_x, query_x)
    return torch.stack([per_task({k: p[t] for k, p in adapted.items()}, s, q)
                        for t, (s, q) in enumerate(zip(support_x, query_x))])
