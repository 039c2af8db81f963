"""The one functional inner loop shared by every algorithm (MAML, FOMAML, ANIL, Meta-SGD, MAML++, Reptile).

Parameters travel as plain dicts (``Params``); the backbone is run through ``torch.func.functional_call``.
``adapt`` adapts ONE task and is a pure function ``params -> adapted params``; ``adapt_tasks`` maps it over a
meta-batch with one of three engines:

- "vmap": ``torch.func.vmap`` over ``adapt`` (inner gradients from ``torch.func.grad``);
- "sequential": a Python loop over tasks (the reference);
- "batched": an explicit task dimension. The shared parameters are expanded to ``[T, *shape]`` and the
  backbone's own ``batched_forward(params, x [T, n, ...])`` runs all tasks in one set of tensor ops (Conv4:
  one grouped convolution per layer). Tasks are independent, so ONE ``torch.autograd.grad`` of the summed task
  losses w.r.t. the expanded copy gives every task's own inner gradient. Backbones without
  ``batched_forward`` (or a task loss not made by :func:`functional_loss`) silently fall back to "sequential".
- "batched-fused": "batched" through the backbone's ``fused_batched_forward`` (Conv4: every grouped convolution's
  derivatives as native whole-group kernels, ``models/grouped_conv.py``): the same values and first-order gradients
  bit for bit, second-order meta-gradients to rounding. Backbones without it run ``batched_forward``.

With ``first_order=False`` the adapted parameters stay differentiable w.r.t. the incoming ones by ordinary
outer autograd, so ``meta_loss(...).backward()`` is second-order MAML. Backbones must be buffer-free (see
``metabench.models.backbones.BatchNorm2d``) for vmap to be exact.

The inner step size is ``config.lr`` unless ``lrs`` (a dict like ``params``, same shapes) is given: then each
entry has its own step size, ``theta - lrs * grad`` elementwise (Meta-SGD, Li et al. 2017). ``lrs`` may require
grad; the meta-gradient then reaches them through every engine exactly as it reaches ``params``. ``lrs`` may also
be a sequence of such dicts, one per inner step (step ``i`` uses ``lrs[i - 1]``); their values only need to
broadcast against the parameters, so 0-dim tensors give MAML++'s learned per-layer per-step rates (LSLR).

MAML++ (Antoniou et al. 2019) adds two more arguments, both None for every other algorithm:

- ``step_params``: parameters of the model that change with the inner step but are not adapted (MAML++'s per-step
  batch-norm weights and biases): each value carries a leading ``steps`` dim, and the model sees row ``i - 1``
  during inner step ``i`` (support forward and inner gradient) and in the query forward after it. They are passed
  to ``functional_call`` / ``batched_forward`` next to the adapted parameters (:func:`with_step_params`), so every
  engine handles them, and the meta-gradient reaches each row only through the computations of its own step.
- ``step_weights`` (:func:`meta_loss`): the multi-step loss, ``sum_i w_i * (mean query loss after step i)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metabench.models.hparams import BATCHED_ENGINES, INNER_ENGINES, INNER_OPTIMIZERS

Params = dict[str, Tensor]
Lrs = Params | Sequence[Params]  # per-entry inner step sizes, or one such dict per inner step (LSLR)
TaskLoss = Callable[[Params, Tensor, Tensor], Tensor]  # (params, x, y) -> scalar loss of ONE task
ENGINES = INNER_ENGINES


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
        if self.optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {self.optimizer!r}; known: {', '.join(INNER_OPTIMIZERS)}")


@dataclass(frozen=True)
class InnerState:
    """An Adam inner optimizer's state carried from one adaptation into the next (Reptile's code keeps one).

    Attributes:
        m, v: Adam's first and second moments per adapted parameter (an absent name means zero, i.e. fresh).
        count: Adam updates applied so far; the next update's bias corrections use ``count + 1``.

    ``supervised_reptile`` builds ONE ``tf.train.AdamOptimizer(beta1=0)`` and restores only the trainable variables
    after each task, so its moments and update counter run on across tasks and meta-iterations; evaluation restores
    every variable after each episode, so each test episode starts from the state training ended with.
    """

    m: Params
    v: Params
    count: int = 0

    @staticmethod
    def fresh() -> InnerState:
        return InnerState({}, {}, 0)

    def detached(self) -> InnerState:
        return InnerState({k: t.detach() for k, t in self.m.items()}, {k: t.detach() for k, t in self.v.items()},
                          self.count)

    def to(self, device: torch.device | str) -> InnerState:
        return InnerState({k: t.to(device) for k, t in self.m.items()}, {k: t.to(device) for k, t in self.v.items()},
                          self.count)


class FunctionalLoss:
    """A :data:`TaskLoss` made of a model and an output loss; keeps both so the "batched" engine can reach the
    model's ``batched_forward`` and apply the output loss per task."""

    def __init__(self, model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.model = model
        self.loss = loss

    def __call__(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(functional_call(self.model, params, (x,)), y)


def functional_loss(model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor]) -> FunctionalLoss:
    """Turn ``model`` and an output loss into a :data:`TaskLoss` of explicit parameters."""
    return FunctionalLoss(model, loss)


def supports_batched(model: nn.Module, params: Params | None = None) -> bool:
    """Whether ``model`` has a ``batched_forward(params [T, ...], x [T, n, ...])`` for the "batched" engine
    and, when ``params`` is given, whether they are parameters of it. A subset (e.g. the head only, or all but
    batch norm) is fine: :func:`with_frozen` completes it with the module's own parameters, shared by the tasks."""
    if not callable(getattr(model, "batched_forward", None)):
        return False
    return params is None or set(params) <= {name for name, _ in model.named_parameters()}


def supports_fused(model: nn.Module) -> bool:
    """Whether ``model`` has a ``fused_batched_forward`` (what makes "batched-fused" differ from "batched")."""
    return supports_batched(model) and callable(getattr(model, "fused_batched_forward", None))


def batched_forward_of(model: nn.Module, engine: str) -> Callable[[Params, Tensor], Tensor]:
    """The forward over a task dim that ``engine`` (one of :data:`BATCHED_ENGINES`) runs ``model`` with."""
    return model.fused_batched_forward if engine == "batched-fused" and supports_fused(model) else model.batched_forward


def with_frozen(model: nn.Module, params: Params, tasks: int) -> Params:
    """``params`` (``[tasks, *shape]``) plus every other parameter of ``model`` expanded to ``[tasks, *shape]``.

    The frozen parameters are the module's live tensors, so the outer gradient reaches them through the
    expansion exactly as it does through ``functional_call`` on the sequential engine.
    """
    frozen = {k: p.expand(tasks, *p.shape) for k, p in model.named_parameters() if k not in params}
    return {**frozen, **params}


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) derivative at 0: second-order Adam would otherwise give inf * 0."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def _lrs_at(lrs: Lrs | None, step: int) -> Params | None:
    """The step sizes of inner step ``step`` (1-based): ``lrs`` itself, or its entry for that step."""
    return lrs if lrs is None or isinstance(lrs, dict) else lrs[step - 1]


def lr_tensors(lrs: Lrs | None) -> list[Tensor]:
    """Every rate tensor of ``lrs`` (a dict, or one dict per inner step)."""
    if lrs is None:
        return []
    return list(lrs.values()) if isinstance(lrs, dict) else [t for step in lrs for t in step.values()]


def step_rows(step_params: Params, index: int) -> Params:
    """Row ``index`` (0-based inner step) of every per-step parameter."""
    return {k: v[index] for k, v in step_params.items()}


def with_step_params(adapted: Params, step_params: Params | None, steps: int) -> Params:
    """``adapted`` (``[T, *shape]``) plus the per-step parameters the model uses after ``steps`` inner steps (row
    ``steps - 1``; row 0 without steps), expanded over the task dim: what a query forward after ``steps`` steps
    needs. Without ``step_params``, ``adapted`` itself."""
    if not step_params:
        return adapted
    tasks = next(iter(adapted.values())).shape[0]
    rows = step_rows(step_params, max(steps, 1) - 1)
    return {**{k: v.expand(tasks, *v.shape) for k, v in rows.items()}, **adapted}


def adapt(params: Params, task_loss: TaskLoss, x: Tensor, y: Tensor, config: InnerConfig,
          lrs: Lrs | None = None, step_params: Params | None = None,
          trajectory: bool = False, state: InnerState | None = None) -> Params | list[Params]:
    """Adapt ``params`` to ONE task (support ``x``, ``y``) with ``config.steps`` gradient steps.

    Pure: returns new tensors, never touches ``params``. With ``first_order=False`` the result is
    differentiable w.r.t. ``params`` through every inner step; with ``first_order=True`` the inner
    gradients are constants, so d(adapted)/d(params) is the identity (for SGD). ``lrs``: per-entry step
    sizes replacing ``config.lr`` (Meta-SGD), or one dict per step (LSLR); the result is differentiable w.r.t.
    them in both modes. ``step_params``: per-step, non-adapted parameters (row ``i - 1`` at step ``i``; see the
    module docstring). ``trajectory``: return the list of the parameters after each step instead of the last.
    ``state``: the Adam state to start from (None: fresh); :func:`adapt_with_state` also returns the state after.
    """
    return adapt_with_state(params, task_loss, x, y, config, lrs, step_params, trajectory, state)[0]


def adapt_with_state(params: Params, task_loss: TaskLoss, x: Tensor, y: Tensor, config: InnerConfig,
                     lrs: Lrs | None = None, step_params: Params | None = None, trajectory: bool = False,
                     state: InnerState | None = None) -> tuple[Params | list[Params], InnerState]:
    """:func:`adapt`, starting the inner optimizer from ``state`` and returning its state after the last step
    (Reptile's persistent Adam state: the next task starts where this one ended)."""
    grad_fn = grad(task_loss)
    start = state or InnerState.fresh()
    m: Params = dict(start.m)
    v: Params = dict(start.v)
    path: list[Params] = []
    for step in range(1, config.steps + 1):
        xi, yi = (x[step - 1], y[step - 1]) if config.per_step_batches else (x, y)
        if step_params:  # this step's rows sit beside the adapted parameters; only the latter are differentiated
            rows = step_rows(step_params, step - 1)
            grad_fn = grad(lambda p, xb, yb, rows=rows: task_loss({**rows, **p}, xb, yb))
        if config.first_order:
            with torch.no_grad():  # torch.func.grad still differentiates inside; the OUTER graph is not built
                grads = grad_fn(params, xi, yi)
        else:
            grads = grad_fn(params, xi, yi)
        params = _inner_update(params, grads, m, v, start.count + step, config, _lrs_at(lrs, step))
        if trajectory:
            path.append(params)
    return (path if trajectory else params), InnerState(m, v, start.count + config.steps)


def _inner_update(params: Params, grads: Params, m: Params, v: Params, step: int, config: InnerConfig,
                  lrs: Params | None = None) -> Params:
    """One inner step (SGD, or Adam with state ``m``, ``v`` updated in the dicts; empty dicts mean zero state).

    ``step`` is Adam's update count including this one (its bias corrections); 1 for a fresh state's first step.

    ``lrs[k]`` (shape of the parameter, or anything that broadcasts to it: a 0-dim LSLR rate) replaces ``config.lr``
    for parameter ``k``; it broadcasts over a leading task dim, so the "batched" engine's ``[T, *shape]``
    parameters share one set of rates.
    """
    if config.optimizer == "sgd":
        if lrs is not None:  # Meta-SGD: theta - alpha * grad, elementwise (l2l's meta_sgd_update, same op order)
            return {k: p - lrs[k] * grads[k] for k, p in params.items()}
        # One fused op (and one in the backward) instead of mul + sub (+ neg): these are the largest tensors of a
        # batched meta-step ([T, *shape]); what it bought is in docs/performance.md.
        return {k: torch.add(p, grads[k], alpha=-config.lr) for k, p in params.items()}
    if lrs is None and _plain_tensors(params, grads, m, v):
        return _adam_foreach(params, grads, m, v, step, config)
    beta1, beta2 = config.adam_betas
    new_params = {}
    for k, p in params.items():
        g = grads[k]
        m[k] = (1.0 - beta1) * g if k not in m else beta1 * m[k] + (1.0 - beta1) * g
        v[k] = (1.0 - beta2) * g * g if k not in v else beta2 * v[k] + (1.0 - beta2) * g * g
        m_hat = m[k] / (1.0 - beta1**step)
        v_hat = v[k] / (1.0 - beta2**step)
        lr = config.lr if lrs is None else lrs[k]
        new_params[k] = p - lr * m_hat / (_safe_sqrt(v_hat) + config.adam_eps)
    return new_params


def _plain_tensors(params: Params, grads: Params, m: Params, v: Params) -> bool:
    """Whether an Adam step may run on ``torch._foreach_*`` ops: nothing to differentiate (first order), no
    functorch wrapper (the "vmap" engine), and every moment already of its gradient's shape (no broadcasting)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*params.values(), *grads.values())):
        return False
    if any(torch._C._functorch.is_functorch_wrapped_tensor(g) for g in grads.values()):
        return False
    return all(not state or (set(state) == set(grads) and all(state[k].shape == g.shape for k, g in grads.items()))
               for state in (m, v))


def _adam_foreach(params: Params, grads: Params, m: Params, v: Params, step: int, config: InnerConfig) -> Params:
    """The Adam step of :func:`_inner_update` on lists of tensors: the same operations in the same order (so the
    same bits), one call per operation instead of one per parameter: Reptile's persistent state makes a meta-step 25
    small sequential Adam steps of 18 tensors each (what it bought: docs/performance.md, Reptile)."""
    beta1, beta2 = config.adam_betas
    keys = list(params)
    g = [grads[k] for k in keys]
    new_m = torch._foreach_mul(g, 1.0 - beta1)
    if m:  # every parameter has its moments, or none has (see _plain_tensors)
        new_m = torch._foreach_add(torch._foreach_mul([m[k] for k in keys], beta1), new_m)
    new_v = torch._foreach_mul(torch._foreach_mul(g, 1.0 - beta2), g)
    if v:
        new_v = torch._foreach_add(torch._foreach_mul([v[k] for k in keys], beta2), new_v)
    m.update(zip(keys, new_m))
    v.update(zip(keys, new_v))
    m_hat = torch._foreach_div(new_m, 1.0 - beta1**step)
    denom = torch._foreach_add(torch._foreach_sqrt(torch._foreach_div(new_v, 1.0 - beta2**step)), config.adam_eps)
    updates = torch._foreach_div(torch._foreach_mul(m_hat, config.lr), denom)
    return dict(zip(keys, torch._foreach_sub([params[k] for k in keys], updates)))


def _batched_ok(task_loss: TaskLoss, params: Params) -> bool:
    return isinstance(task_loss, FunctionalLoss) and supports_batched(task_loss.model, params)


def adapt_batched(params: Params, task_loss: FunctionalLoss, xs: Tensor, ys: Tensor, config: InnerConfig,
                  lrs: Lrs | None = None, step_params: Params | None = None,
                  trajectory: bool = False, state: InnerState | None = None, engine: str = "batched"
                  ) -> Params | list[Params]:
    """``adapt`` for all ``T`` tasks at once with an explicit task dim (the "batched" engines; ``engine`` says which).

    ``params`` (and ``lrs``, ``step_params``, ``state``: every task starts from it) are shared ``[*shape]``; returns
    ``[T, *shape]`` (or, with ``trajectory``, the list of them after each step). Each step runs ``batched_forward``
    once and takes ONE
    ``torch.autograd.grad`` of the summed task losses w.r.t. the per-task parameters: the tasks share no
    computation, so the gradient w.r.t. task ``t``'s slice is task ``t``'s own inner gradient.
    """
    model, loss = task_loss.model, task_loss.loss
    forward = batched_forward_of(model, engine)
    tasks = xs.shape[0]
    per_task_loss = vmap(loss)
    # Second order only where the outer graph can use it; otherwise inner gradients are constants (as in
    # ``adapt``, whose torch.func.grad gives the same values either way).
    second_order = not config.first_order and torch.is_grad_enabled() and any(
        t.requires_grad for t in (*params.values(), *lr_tensors(lrs), *(step_params or {}).values()))
    current = {k: p.expand(tasks, *p.shape) for k, p in params.items()}
    start = state or InnerState.fresh()
    m: Params = dict(start.m)  # shared [*shape] moments broadcast against the [T, *shape] gradients
    v: Params = dict(start.v)
    path: list[Params] = []
    for step in range(1, config.steps + 1):
        xi, yi = (xs[:, step - 1], ys[:, step - 1]) if config.per_step_batches else (xs, ys)
        if second_order:
            # params outside the outer graph (when only the lrs require grad) still need a leaf to differentiate
            leaves = {k: p if p.requires_grad else p.detach().requires_grad_() for k, p in current.items()}
        else:
            leaves = {k: p.detach().requires_grad_() for k, p in current.items()}
        inputs = with_step_params(leaves, step_params, step)  # leaves alone without per-step parameters
        with torch.enable_grad():
            total = per_task_loss(forward(with_frozen(model, inputs, tasks), xi), yi).sum()
            grads = torch.autograd.grad(total, list(leaves.values()), create_graph=second_order,
                                        allow_unused=True, materialize_grads=True)
        current = _inner_update(current, dict(zip(leaves, grads)), m, v, start.count + step, config,
                                _lrs_at(lrs, step))
        if trajectory:
            path.append(current)
    if trajectory:
        return [{k: p.contiguous() for k, p in step.items()} for step in path]
    return {k: p.contiguous() for k, p in current.items()}  # 0 steps: a real [T, ...] copy, as the other engines


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")


def _check_inner_args(params: Params, config: InnerConfig, lrs: Lrs | None, step_params: Params | None) -> None:
    for step_lrs in ([] if lrs is None else [lrs] if isinstance(lrs, dict) else list(lrs)):
        if set(step_lrs) != set(params):
            raise ValueError(f"lrs must name exactly the adapted parameters; missing "
                             f"{sorted(set(params) - set(step_lrs))}, extra {sorted(set(step_lrs) - set(params))}")
    if lrs is not None and not isinstance(lrs, dict) and len(lrs) < config.steps:
        raise ValueError(f"per-step lrs cover {len(lrs)} steps, the inner loop takes {config.steps}")
    if step_params:
        if set(step_params) & set(params):
            raise ValueError(f"step_params may not be adapted too: {sorted(set(step_params) & set(params))}")
        short = [k for k, v in step_params.items() if v.shape[0] < max(config.steps, 1)]
        if short:
            raise ValueError(f"step_params {short} have fewer rows than the {config.steps} inner steps")


def adapt_tasks(params: Params, task_loss: TaskLoss, xs: Tensor, ys: Tensor, config: InnerConfig,
                engine: str = "vmap", lrs: Lrs | None = None, step_params: Params | None = None,
                trajectory: bool = False, state: InnerState | None = None) -> Params | list[Params]:
    """Adapt ``params`` to each task of a meta-batch: ``xs [T, n, ...]``, ``ys [T, n, ...]``.

    ``lrs``: per-entry inner step sizes shared by the tasks (Meta-SGD), or one dict per step (LSLR), else
    ``config.lr``. ``step_params``: per-step non-adapted parameters, shared by the tasks (MAML++'s batch norm).
    ``state``: the Adam state EVERY task starts from (None: fresh); the tasks do not pass it on to each other.
    Returns adapted parameters with a leading task dim ``[T, *shape]``; with ``trajectory``, the list of them
    after each inner step (MAML++'s multi-step loss).
    """
    _check_engine(engine)
    _check_inner_args(params, config, lrs, step_params)
    if engine == "vmap":
        return vmap(adapt, in_dims=(None, None, 0, 0, None, None, None, None, None))(
            params, task_loss, xs, ys, config, lrs, step_params, trajectory, state)
    if engine in BATCHED_ENGINES and _batched_ok(task_loss, params):
        return adapt_batched(params, task_loss, xs, ys, config, lrs, step_params, trajectory,  # type: ignore[arg-type]
                             state, engine)
    per_task = [adapt(params, task_loss, x, y, config, lrs, step_params, trajectory, state) for x, y in zip(xs, ys)]
    if trajectory:
        return [{k: torch.stack([p[i][k] for p in per_task]) for k in params} for i in range(config.steps)]
    return {k: torch.stack([p[k] for p in per_task]) for k in params}


def task_outputs(model: nn.Module, adapted: Params, xs: Tensor, engine: str = "vmap") -> Tensor:
    """Outputs of ``model`` on ``xs [T, m, ...]`` with each task's adapted parameters -> ``[T, m, ...]``."""
    _check_engine(engine)

    def forward(params: Params, x: Tensor) -> Tensor:
        return functional_call(model, params, (x,))

    if engine == "vmap":
        return vmap(forward)(adapted, xs)
    if engine in BATCHED_ENGINES and supports_batched(model, adapted):
        return batched_forward_of(model, engine)(with_frozen(model, adapted, xs.shape[0]), xs)
    return torch.stack([forward({k: p[t] for k, p in adapted.items()}, x) for t, x in enumerate(xs)])


def _query_losses(task_loss_fn: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, query_y: Tensor,
                  engine: str) -> Tensor:
    if engine == "vmap" or engine in BATCHED_ENGINES:
        return vmap(task_loss_fn)(outputs, query_y)
    return torch.stack([task_loss_fn(o, y) for o, y in zip(outputs, query_y)])


def meta_loss(model: nn.Module, params: Params, task_loss_fn: Callable[[Tensor, Tensor], Tensor],
              support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, config: InnerConfig,
              engine: str = "vmap", lrs: Lrs | None = None, step_params: Params | None = None,
              step_weights: Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """MAML's objective (FOMAML's with ``config.first_order``): mean over tasks of the query loss after adapting.

    ``task_loss_fn(outputs, targets)`` is the per-task loss (e.g. ``F.cross_entropy``), used both for the
    inner steps on the support set and for the query loss. ``lrs``: per-entry inner step sizes (Meta-SGD) or
    one dict per step (LSLR); ``step_params``: per-step non-adapted parameters (MAML++'s batch norm).
    ``step_weights`` (one float per inner step; MAML++'s multi-step loss): the objective is instead
    ``sum_i step_weights[i-1] * (mean over tasks of the query loss after step i)``; steps of weight 0 are not
    evaluated, except the last. Returns ``(loss, query_outputs)``: a scalar differentiable w.r.t. ``params`` (and
    ``lrs``, ``step_params``) and the detached query outputs ``[T, m, ways]`` after the last step.
    """
    task_loss = functional_loss(model, task_loss_fn)
    if step_weights is None:
        adapted = adapt_tasks(params, task_loss, support_x, support_y, config, engine, lrs, step_params)
        outputs = task_outputs(model, with_step_params(adapted, step_params, config.steps), query_x, engine)
        return _query_losses(task_loss_fn, outputs, query_y, engine).mean(), outputs.detach()
    if config.steps < 1 or len(step_weights) != config.steps:
        raise ValueError(f"step_weights needs one weight per inner step ({config.steps}), got {len(step_weights)}")
    path = adapt_tasks(params, task_loss, support_x, support_y, config, engine, lrs, step_params, trajectory=True)
    loss: Tensor | None = None
    for step, (weight, adapted) in enumerate(zip(step_weights, path), start=1):
        if weight == 0 and step < config.steps:
            continue
        outputs = task_outputs(model, with_step_params(adapted, step_params, step), query_x, engine)
        term = weight * _query_losses(task_loss_fn, outputs, query_y, engine).mean()
        loss = term if loss is None else loss + term
    assert loss is not None  # the last step is always evaluated
    return loss, outputs.detach()


def meta_backward(model: nn.Module, params: Params, task_loss_fn: Callable[[Tensor, Tensor], Tensor],
                  support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, config: InnerConfig,
                  engine: str = "vmap", task_chunk: int | None = None, lrs: Lrs | None = None,
                  step_params: Params | None = None,
                  step_weights: Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """``meta_loss(...).backward()`` in chunks of ``task_chunk`` tasks, to cap memory.

    The meta-loss is the mean of independent task losses, so its gradient is the sum over chunks of
    ``(chunk size / T) * grad(mean loss of the chunk)``: each chunk's graph is built, back-propagated into
    ``.grad`` (accumulating, like ``backward``) and freed before the next, so peak memory scales with the chunk,
    not the meta-batch. ``task_chunk=None`` (or >= T) is one chunk. ``lrs``, ``step_params``, ``step_weights``: as
    in :func:`meta_loss`. Returns the detached meta-loss and the detached query outputs ``[T, m, ...]``.
    """
    tasks = support_x.shape[0]
    chunk = tasks if task_chunk is None else task_chunk
    if chunk <= 0:
        raise ValueError(f"task_chunk must be a positive number of tasks or None, got {task_chunk}")
    total = torch.zeros((), dtype=query_x.dtype if query_x.is_floating_point() else torch.float32,
                        device=query_x.device)
    outputs = []
    for start in range(0, tasks, chunk):
        part = slice(start, min(start + chunk, tasks))
        loss, out = meta_loss(model, params, task_loss_fn, support_x[part], support_y[part], query_x[part],
                              query_y[part], config, engine, lrs, step_params, step_weights)
        weight = (part.stop - part.start) / tasks
        (loss * weight).backward()
        total = total + loss.detach() * weight
        outputs.append(out)
    return total, torch.cat(outputs)


def minibatch_rows(n: int, steps: int, size: int, generator: torch.Generator) -> Tensor:
    """Support-set rows ``[steps, size]`` for ``steps`` minibatch steps of ``size`` images out of ``n``, drawn as
    Reptile's code draws them without replacement (supervised_reptile/reptile.py ``_mini_batches``): shuffle, cut
    minibatches in order, shuffle anew when a pass is used up; a minibatch may straddle two passes."""
    passes = -(-steps * size // n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])
    return order[:steps * size].reshape(steps, size)


@torch.no_grad()
def reptile_update(params: Params, adapted: Params, epsilon: float) -> Params:
    """Reptile's outer step: ``theta + epsilon * (mean_over_tasks(adapted) - theta)`` (no autograd)."""
    return {k: p + epsilon * (adapted[k].mean(dim=0) - p) for k, p in params.items()}


def default_engine(device: torch.device | str) -> str:
    """The fallback engine for "auto" when nothing has been timed yet: "vmap" on CUDA, "sequential" on CPU.

    "auto" in the Lightning modules times :func:`engine_candidates` on the first training step
    (:func:`choose_engine`) because the winner depends on the protocol as well as the device (measurements:
    docs/performance.md).
    """
    return "vmap" if torch.device(device).type == "cuda" else "sequential"


def engine_candidates(device: torch.device | str, model: nn.Module | None = None) -> tuple[str, ...]:
    """The engines worth timing on ``device`` for ``model`` (what ``engine: auto`` chooses among).

    CPU: "batched-fused" (when ``model`` has a ``fused_batched_forward``), "batched" (when it has a
    ``batched_forward``) and "sequential" -- which one wins depends on the protocol. vmap is left out on CPU, where
    it was slower than sequential on Conv4. CUDA: "vmap" and the batched engines; the sequential loop is far slower
    there. ``model`` None: every engine that some backbone runs. The measurements are in docs/performance.md.
    """
    fused = ("batched-fused",) if model is None or supports_fused(model) else ()
    batched = (*fused, "batched") if model is None or supports_batched(model) else ()
    if torch.device(device).type == "cuda":
        return ("vmap", *batched)
    return (*batched, "sequential")


def time_engines(run: Callable[[str], object], candidates: Sequence[str], device: torch.device | str,
                 repeats: int = 1) -> dict[str, float]:
    """Seconds of ``run(engine)`` for each candidate (the best of ``repeats`` calls; CUDA synchronised).

    ``run`` must be free of side effects (e.g. a meta-loss and ``torch.autograd.grad``, gradients discarded,
    no optimizer step): it is called ``repeats`` times per candidate.
    """
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds: dict[str, float] = {}
    for engine in candidates:
        _check_engine(engine)
        best = float("inf")
        for _ in range(max(repeats, 1)):
            sync()
            start = time.perf_counter()
            run(engine)
            sync()
            best = min(best, time.perf_counter() - start)
        seconds[engine] = best
    return seconds


def choose_engine(run: Callable[[str], object], candidates: Sequence[str], device: torch.device | str,
                  repeats: int = 1) -> tuple[str, dict[str, float]]:
    """The fastest candidate by :func:`time_engines` (ties: the first listed) and every candidate's seconds.

    A single candidate is returned without running anything.
    """
    if not candidates:
        raise ValueError("choose_engine needs at least one candidate engine")
    if len(candidates) == 1:
        _check_engine(candidates[0])
        return candidates[0], {}
    seconds = time_engines(run, candidates, device, repeats)
    return min(candidates, key=lambda e: seconds[e]), seconds


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

    if engine in BATCHED_ENGINES and supports_batched(model, adapted):
        # every (task, query) pair is its own "task": its support set plus that one query, with the task's params
        tasks, m, n = query_x.shape[0], query_x.shape[1], support_x.shape[1]
        batch = torch.cat([support_x.unsqueeze(1).expand(tasks, m, *support_x.shape[1:]), query_x.unsqueeze(2)],
                          dim=2).reshape(tasks * m, n + 1, *query_x.shape[2:])
        repeated = {k: p.unsqueeze(1).expand(tasks, m, *p.shape[1:]).reshape(tasks * m, *p.shape[1:])
                    for k, p in adapted.items()}
        outputs = batched_forward_of(model, engine)(with_frozen(model, repeated, tasks * m), batch)[:, -1]
        return outputs.reshape(tasks, m, *outputs.shape[1:])
    per_task = vmap(one_query, in_dims=(None, None, 0))  # over the m query examples of one task
    if engine == "vmap":
        return vmap(per_task)(adapted, support_x, query_x)
    return torch.stack([per_task({k: p[t] for k, p in adapted.items()}, s, q)
                        for t, (s, q) in enumerate(zip(support_x, query_x))])
