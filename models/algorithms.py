"""MAML, FOMAML, ANIL, Meta-SGD, MAML++ and Reptile as Lightning modules, all on the ONE functional inner loop
(``inner_loop``).

- MAML: meta-loss = mean over tasks of the query loss at the adapted parameters; gradients flow through
  the inner steps (second order). FOMAML is its subclass without second order (inner gradients detached).
- ANIL (Raghu et al. 2020): the MAML subclass with ``config.adapt = ["head"]``: the inner loop adapts the head
  only, the outer step trains everything (second order through the head's adaptation).
- Meta-SGD (Li et al. 2017): the MAML module plus a learned inner step size per parameter entry (the inner
  step is ``theta - alpha * grad`` elementwise), meta-learned by the same outer Adam step; evaluation adapts
  with the learned rates.
- MAML++ (Antoniou et al. 2019): the MAML module with five switches (:class:`MAMLPlusPlus`): multi-step loss,
  learned per-layer per-step inner rates, per-step batch norm, derivative-order annealing, cosine annealing of
  the meta learning rate. They reach the inner loop through the hooks every MetaLearner has (``inner_lrs``,
  ``step_params``, ``step_weights``, ``inner_config``), so MAML's training step serves it unchanged.
- Reptile (Nichol et al. 2018): k inner steps (SGD or Adam with beta1 = 0) per task, then
  ``theta <- theta + eps * (mean adapted - theta)``. It is written as plain SGD with learning rate ``eps``
  on the "gradient" ``theta - mean adapted``, so Lightning counts steps, checkpoints the optimizer and
  anneals ``eps`` linearly with an LR scheduler. Meta-batch 1 is the paper's serial version, > 1 its
  batched version.
- Transfer (the fine-tuning baseline, e.g. Hendryx et al. 2019 for segmentation): plain supervised training
  of the initial parameters on every image of the meta-batch (Adam, ``meta_lr``); evaluated exactly like the
  meta-learners. Only meaningful for class-agnostic labels (1-way segmentation). Its training loop,
  :class:`FineTuning`, is also that of Baseline / Baseline++ (``models/baselines.py``, with ProtoNet).
- ``config.adapt`` (parameter-name prefixes) restricts the inner loop to those parameters; the others are
  read from the module inside ``functional_call`` (frozen in the inner loop, still trained by the outer step).
- Evaluation adapts on each fixed episode's support set with the evaluation steps (always first order:
  no meta-gradient is needed) and scores the queries; batch-norm statistics come from the query batch
  ("transductive", as the MAML code) or from the support set plus one query ("non-transductive").
- Every learner registers itself in :data:`LEARNERS` with its name, capabilities and config class
  (``models/learners.py`` looks them up, with other packages' learners).
- Several processes (DDP, ``benchmarks/core/distributed.py``): each rank trains on its share of the meta-batch and every
  algorithm calls :meth:`MetaLearner.sync_meta_gradient` between its backward and its optimizer step, which
  makes the gradient exactly the single-process one; evaluation batches are split round-robin and the scores
  gathered back in episode order, so records do not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from metabench.core.distributed import all_reduce_gradients, broadcast_object, gather_in_order
from metabench.core.registry import Registry, RegistryError
from metabench.core.stats import mean_ci95
from metabench.datasets.episodes import MetaBatch
from metabench.models.hparams import ANIL_HEAD, MAMLPP_SWITCHES, AlgorithmConfig, Capabilities
from metabench.models.inner_loop import (
    InnerConfig,
    InnerState,
    Lrs,
    Params,
    adapt_tasks,
    adapt_with_state,
    choose_engine,
    default_engine,
    engine_candidates,
    functional_loss,
    lr_tensors,
    meta_backward,
    meta_loss,
    minibatch_rows,
    non_transductive_outputs,
    task_outputs,
    with_step_params,
)
from metabench.models.norm import is_norm, make_norm_per_step
from metabench.models.problems import Classification, Segmentation

Problem = Classification | Segmentation


class DivergenceError(RuntimeError):
    """The meta-loss became NaN or infinite; training stops and the last good checkpoint is kept."""


# Shared fields that only some learners read, with the value that means "unused" (MetaLearner.config_keys).
OPTIONAL_KEYS: dict[str, Any] = {**{key: False for key in MAMLPP_SWITCHES}, "inner_state": "per_task",
                                 "lr_decay_every": None, "patience": None}
OPTIONAL_KEY_USERS = {**{key: "a MAML++ switch: use --algorithm mamlpp" for key in MAMLPP_SWITCHES},
                      "inner_state": "persistent: reptile's inner Adam state; the meta-gradient learners' tasks are "
                                     "independent by construction",
                      "lr_decay_every": "step decay: transfer, protonet, baseline, baseline++",
                      "patience": "early stopping: protonet"}


class MetaLearner(L.LightningModule):
    """Shared evaluation, logging and adaptation for every gradient-based meta-learner.

    A learner is one self-describing class: ``name`` (what ``--algorithm`` takes), ``capabilities`` (what the
    runner and the CLI may do with it), ``config_class`` (its hyper-parameters: :class:`AlgorithmConfig` or a
    subclass adding fields of its own) and :meth:`check_config` (what it alone accepts or requires). It is listed
    by registering it: ``@LEARNERS.register("name")`` here, or an entry point of group ``metabench.algorithms``
    in another package (docs/extending.md).
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    config_class: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    # Fields of the shared AlgorithmConfig that only some learners read: a learner that does not list one refuses
    # a value other than the field's default, rather than ignoring it silently.
    config_keys: ClassVar[frozenset[str]] = frozenset()
    # A built-in learner whose preset section serves this one on a benchmark whose preset does not name it
    # (e.g. a MAML variant run with MAML's hyper-parameters); None: the preset must name it.
    preset_base: ClassVar[str | None] = None

    @classmethod
    def check_config(cls, config: AlgorithmConfig) -> AlgorithmConfig:
        """``config`` as this learner runs it (e.g. ANIL fills in its head-only ``adapt``), or ``ValueError``
        naming the first value this learner cannot honour. Called when a run's configuration is resolved and
        when the module is built."""
        if not isinstance(config, cls.config_class):
            raise ValueError(f"{cls.name or cls.__name__} needs a {cls.config_class.__name__} configuration, "
                             f"got {type(config).__name__}")
        for key in OPTIONAL_KEYS:
            if key not in cls.config_keys and getattr(config, key) != OPTIONAL_KEYS[key]:
                users = OPTIONAL_KEY_USERS.get(key, "another learner")
                raise ValueError(f"algorithm.{key} is not used by {config.name} ({users}): leave it at "
                                 f"{OPTIONAL_KEYS[key]!r}")
        return config

    def __init__(self, backbone: nn.Module, problem: Problem, config: AlgorithmConfig,
                 max_steps: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.problem = problem
        self.config = config
        self.max_steps = max_steps
        self.engine = config.engine  # "auto" until the first training step times the candidates
        self.engine_timings: dict[str, float] = {}  # "auto": seconds of each candidate on the first meta-batch
        self.adapted_names = adapted_parameter_names(backbone, config.adapt, config.adapt_norm)
        self.task_loss = functional_loss(backbone, self.inner_loss)
        self._scores: dict[str, list[torch.Tensor]] = {"val": [], "test": []}
        self._stats: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}
        self.test_scores: torch.Tensor | None = None  # per-episode scores of the last test run, in order
        self.test_metrics: dict[str, float] = {}  # the problem's summary metrics of the last test run (mIoU, ...)
        self.val_metrics: dict[str, float] = {}
        self.last_val_mean: float | None = None  # mean score of the last validation run (for the curve)
        self._pending: tuple[torch.Tensor, int] | None = None  # automatic optimization: (local loss, local tasks)

    # -- shared pieces ---------------------------------------------------------------------------------------

    def inner_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The adaptation loss: the problem's mean loss times ``inner_loss_scale`` (see AlgorithmConfig), times the
        batch's images with ``inner_loss_sum`` (the sum of the per-image losses)."""
        loss = self.problem.loss(outputs, targets) * self.config.inner_loss_scale
        return loss * outputs.shape[0] if self.config.inner_loss_sum else loss

    def params(self) -> Params:
        """The parameters the inner loop adapts (all of them unless ``config.adapt`` names prefixes).

        Parameters left out are not passed to ``functional_call``, which then reads them from the module: they
        stay fixed during adaptation but remain in the outer autograd graph (MAML trains them through it).
        """
        return {k: v for k, v in self.backbone.named_parameters() if k in self.adapted_names}

    def _resolve_engine(self, probe: Callable[[str], object] | None = None) -> str:
        """The engine to run now. A configured engine is returned as is. For "auto": on the first training step
        (``probe`` given) every candidate of ``engine_candidates`` is timed (best of two calls) on the real meta-batch
        by ``probe(engine)`` (side-effect free: meta-gradient discarded, no optimizer step) and the fastest is kept
        for the rest of the run; before that (e.g. Lightning's sanity validation) ``default_engine`` is used
        without fixing the choice. Which engine wins depends on device AND protocol (see docs/performance.md).
        """
        if self.engine != "auto":
            return self.engine
        if probe is None:
            return default_engine(self.device)
        # The best of two calls per candidate: a candidate's first call pays one-off costs (oneDNN primitives for new
        # shapes, the allocator's first touch of new block sizes), which biased a single call against whichever engine
        # was timed first (docs/performance.md, "Engine choice").
        choice = choose_engine(probe, engine_candidates(self.device, self.backbone), self.device, repeats=2)
        # Several processes: every rank times its own share, rank 0's choice is everyone's (one engine per run).
        self.engine, self.engine_timings = broadcast_object(choice)
        return self.engine

    # "auto" is timed once per run: a resumed run keeps the engine its first step chose (the engines agree only
    # up to float rounding, so switching mid-run would make a resumed run differ from an uninterrupted one).
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["metabench_engine"] = {"engine": self.engine, "timings": dict(self.engine_timings)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("metabench_engine", {})
        if self.config.engine == "auto" and saved.get("engine", "auto") != "auto":
            self.engine, self.engine_timings = saved["engine"], dict(saved.get("timings", {}))

    def inner_lrs(self) -> Lrs | None:
        """Per-parameter inner step sizes (Meta-SGD), keyed like :meth:`params`, or one such dict per inner step
        (MAML++'s LSLR); None: the scalar ``inner_lr`` / ``eval_lr`` of :meth:`inner_config`."""
        return None

    def step_params(self) -> Params | None:
        """Per-step parameters the inner loop passes to the network beside the adapted ones (MAML++'s per-step
        batch norm, ``[steps, ...]`` each); None for every other algorithm."""
        return None

    def step_weights(self) -> Sequence[float] | None:
        """Weights of the query losses after each training inner step (MAML++'s multi-step loss); None: the last
        step's query loss alone (MAML)."""
        return None

    def inner_start_state(self) -> InnerState | None:
        """The inner optimizer's state every evaluation episode starts from (Reptile's persistent Adam state, not
        carried from one episode to the next); None: a fresh state per episode."""
        return None

    def inner_config(self, training: bool) -> InnerConfig:
        cfg = self.config
        if training:
            return InnerConfig(cfg.inner_steps, cfg.inner_lr, not self.capabilities.second_order, cfg.inner_optimizer)
        return InnerConfig(cfg.eval_steps, cfg.eval_lr if cfg.eval_lr is not None else cfg.inner_lr, True,
                           cfg.inner_optimizer)

    def _inputs(self, batch: MetaBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.problem.inputs(batch.support_x), batch.support_y,
                self.problem.inputs(batch.query_x), batch.query_y)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"{self.config.name}: meta-loss is {loss.item()} at step {self.global_step}; training stopped, "
                "the last good checkpoint is kept (lower the learning rates or check the data)")

    def sync_meta_gradient(self, loss: torch.Tensor, tasks: int) -> torch.Tensor:
        """Between backward and the optimizer step: make every ``.grad`` the gradient of the mean over the whole
        meta-batch (``benchmarks/core/distributed.py``; the identity in one process) and stop on a non-finite meta-loss.

        ``loss`` is this process's mean over its ``tasks`` tasks; the global mean is returned and checked, so all
        processes raise :class:`DivergenceError` together (a rank stopping alone would leave the others waiting).
        """
        total = all_reduce_gradients(self.parameters(), tasks / self.config.meta_batch, loss.detach())
        self._check_finite(total)
        return total

    def on_after_backward(self) -> None:
        # Automatic optimization (MAML, Transfer): Lightning's backward is done, its optimizer step comes next.
        if self._pending is not None:
            loss, tasks = self._pending
            self._pending = None
            self.sync_meta_gradient(loss, tasks)

    def evaluate_outputs(self, batch: MetaBatch) -> torch.Tensor:
        """Query outputs ``[T, m, ...]`` after adapting on each episode's support set (evaluation steps)."""
        engine = self._resolve_engine()
        sx, sy, qx, qy = self._inputs(batch)
        params = {k: v.detach() for k, v in self.params().items()}
        lrs = _detached_lrs(self.inner_lrs())
        step_params = self.step_params()
        step_params = None if step_params is None else {k: v.detach() for k, v in step_params.items()}
        config = self.inner_config(False)
        ax, ay = sx, sy
        if self.config.eval_inner_batch is not None:
            ax, ay = self._eval_minibatches(batch, sx, sy, config.steps)
            config = dataclasses.replace(config, per_step_batches=True)
        with torch.enable_grad():  # Lightning evaluates under no_grad; adaptation needs gradients
            adapted = adapt_tasks(params, self.task_loss, ax, ay, config, engine, lrs, step_params,
                                  state=self.inner_start_state())
        with torch.no_grad():
            # the queries see the batch-norm parameters of the last step taken (no per-step ones: adapted as is)
            adapted = with_step_params({k: v.detach() for k, v in adapted.items()}, step_params, config.steps)
            if self.config.bn_mode == "transductive":
                outputs = task_outputs(self.backbone, adapted, qx, engine)
            else:
                outputs = non_transductive_outputs(self.backbone, adapted, sx, qx, engine)
            return outputs

    def _eval_minibatches(self, batch: MetaBatch, sx: torch.Tensor, sy: torch.Tensor,
                          steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each episode's support set as ``steps`` minibatches of ``eval_inner_batch`` images (``[T, steps, b, ...]``,
        :func:`minibatch_rows`), in an order drawn from the episode's index alone: a fixed episode is adapted on the
        same minibatches whatever the batching of the episodes or the number of processes."""
        if batch.episodes is None:
            raise ValueError("algorithm.eval_inner_batch needs the fixed episodes' indices (MetaBatch.episodes)")
        size = self.config.eval_inner_batch
        assert size is not None
        rows = torch.stack([minibatch_rows(sx.shape[1], steps, size, torch.Generator().manual_seed(int(e)))
                            for e in batch.episodes]).to(sx.device)
        tasks = torch.arange(sx.shape[0], device=sx.device)[:, None, None]
        return sx[tasks, rows], sy[tasks, rows]

    def _eval_step(self, stage: str, batch: MetaBatch) -> None:
        outputs = self.evaluate_outputs(batch)
        self._scores[stage].append(self.problem.episode_scores(outputs, batch.query_y).cpu())
        episode_stats = getattr(self.problem, "episode_stats", None)  # segmentation: counts for mIoU / FB-IoU
        if episode_stats is not None:
            self._stats[stage].append((episode_stats(outputs, batch.query_y).cpu(), batch.classes.cpu()))

    def validation_step(self, batch: MetaBatch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: MetaBatch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _close_eval(self, stage: str) -> tuple[torch.Tensor, dict[str, float]]:
        # Several processes: each evaluated every W-th batch; every rank gets all of them, in episode order.
        batches, stats = gather_in_order(self._scores[stage]), gather_in_order(self._stats[stage])
        scores = torch.cat(batches) if batches else torch.empty(0)
        self._scores[stage], self._stats[stage] = [], []
        metrics: dict[str, float] = {}
        if stats:
            metrics = self.problem.summary_metrics(torch.cat([s for s, _ in stats]), torch.cat([c for _, c in stats]))
        if scores.numel():
            mean, ci = mean_ci95(scores.tolist())
            name = self.problem.metric_name
            self.log(f"{stage}/{name}", mean, prog_bar=True)
            self.log(f"{stage}/{name}_ci95", ci)
            for key, value in metrics.items():
                self.log(f"{stage}/{key}", value)
        return scores, metrics

    def on_validation_epoch_end(self) -> None:
        scores, self.val_metrics = self._close_eval("val")
        if scores.numel():
            self.last_val_mean = float(scores.mean())

    def on_test_epoch_end(self) -> None:
        self.test_scores, self.test_metrics = self._close_eval("test")

    def _log_train(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Log the problem's plain mean loss (``loss`` must be that) and score of the query outputs."""
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log(f"train/{self.problem.metric_name}", self.problem.episode_scores(outputs, targets).mean(),
                 prog_bar=True)


def _check_learner(name: str, obj: Any) -> type[MetaLearner]:
    """A registered learner is a MetaLearner subclass that declares its name, capabilities and config class."""
    if not (isinstance(obj, type) and issubclass(obj, MetaLearner)):
        raise RegistryError(f"algorithm {name!r} resolves to {obj!r}, not a subclass of "
                            "metabench.models.algorithms.MetaLearner")
    if not obj.name:
        raise RegistryError(f"algorithm {name!r}: {obj.__qualname__} declares no name (class attribute `name`)")
    if not (isinstance(obj.config_class, type) and issubclass(obj.config_class, AlgorithmConfig)):
        raise RegistryError(f"algorithm {name!r}: {obj.__qualname__}.config_class must subclass AlgorithmConfig")
    if not isinstance(obj.capabilities, Capabilities):
        raise RegistryError(f"algorithm {name!r}: {obj.__qualname__}.capabilities must be a Capabilities")
    return obj


# name -> learner class: metabench's learners register here (below and in models/baselines.py); other packages'
# through the entry-point group "metabench.algorithms" or a "package.module:Class" name (metabench.core.registry).
LEARNERS: Registry[type[MetaLearner]] = Registry("algorithm", "metabench.algorithms", _check_learner)
META_GRADIENT = Capabilities(second_order=True, inner_loop=True, ddp_exact=True)  # MAML's


@LEARNERS.register("maml")
class MAML(MetaLearner):
    """MAML (Finn et al. 2017); :class:`FOMAML` is its first-order approximation, :class:`ANIL` its head-only
    inner loop (``config.adapt``); :class:`MetaSGD` adds learned inner rates (``inner_lrs``).

    With ``config.task_chunk`` the meta-gradient is back-propagated that many tasks at a time inside the step
    (``inner_loop.meta_backward``: same gradient, the memory of one chunk), which needs manual optimization:
    Lightning's automatic loop would call ``backward`` on the returned loss once more.
    """

    name = "maml"
    capabilities = META_GRADIENT

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = self.config.task_chunk is None

    def training_step(self, batch: MetaBatch, batch_idx: int) -> torch.Tensor | None:
        sx, sy, qx, qy = self._inputs(batch)
        params, config, lrs = self.params(), self.inner_config(True), self.inner_lrs()
        step_params, weights = self.step_params(), self.step_weights()
        learned = [*params.values(), *lr_tensors(lrs), *(step_params or {}).values()]

        def probe(engine: str) -> None:  # "auto": one meta-gradient per candidate, discarded
            chunk = self.config.task_chunk or sx.shape[0]  # in the step's chunks: the probe keeps its memory cap
            for start in range(0, sx.shape[0], chunk):
                part = slice(start, start + chunk)
                probe_loss, _ = meta_loss(self.backbone, params, self.inner_loss, sx[part], sy[part], qx[part],
                                          qy[part], config, engine, lrs, step_params, weights)
                torch.autograd.grad(probe_loss, learned, allow_unused=True)

        engine = self._resolve_engine(probe)
        if self.automatic_optimization:
            loss, outputs = meta_loss(self.backbone, params, self.inner_loss, sx, sy, qx, qy, config, engine, lrs,
                                      step_params, weights)
            self._pending = (loss.detach(), sx.shape[0])  # synced and checked in on_after_backward
            self._log_meta_loss(loss, weights, outputs, qy)
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss, outputs = meta_backward(self.backbone, params, self.inner_loss, sx, sy, qx, qy, config, engine,
                                      self.config.task_chunk, lrs, step_params, weights)
        self.sync_meta_gradient(loss, sx.shape[0])  # before the step: a diverged meta-gradient never lands
        optimizer.step()
        scheduler = self.lr_schedulers()  # manual optimization: Lightning leaves stepping it to us
        if scheduler is not None:
            scheduler.step()
        self._log_meta_loss(loss, weights, outputs, qy)
        return None

    def _log_meta_loss(self, loss: torch.Tensor, weights: Sequence[float] | None, outputs: torch.Tensor,
                       targets: torch.Tensor) -> None:
        """Log the last step's plain mean query loss, comparable across algorithms: the meta-loss unscaled, or
        (multi-step loss) recomputed from the last step's query outputs."""
        if weights is not None:
            loss = torch.stack([self.problem.loss(o, y) for o, y in zip(outputs, targets)]).mean()
        else:
            loss = loss / self.config.inner_loss_scale
        self._log_train(loss, outputs, targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.config.meta_lr)  # with Meta-SGD: the rates too


@LEARNERS.register("fomaml")
class FOMAML(MAML):
    """First-order MAML (Finn et al. 2017, Sec. 5.2): MAML's step with the inner gradients detached."""

    name = "fomaml"
    capabilities = dataclasses.replace(META_GRADIENT, second_order=False)


@LEARNERS.register("anil")
class ANIL(MAML):
    """ANIL (Raghu et al. 2020): MAML whose inner loop adapts the head only (``adapt: [head]`` unless set), at
    training and test time; the outer step trains everything, second order through the head's adaptation."""

    name = "anil"

    @classmethod
    def check_config(cls, config: AlgorithmConfig) -> AlgorithmConfig:
        config = super().check_config(config)
        return config if config.adapt is not None else dataclasses.replace(config, adapt=[ANIL_HEAD])


def _lr_key(name: str) -> str:
    """A parameter name as a ParameterDict key (which may not contain ".")."""
    return name.replace(".", "/")


def _detached_lrs(lrs: Lrs | None) -> Lrs | None:
    if lrs is None:
        return None
    if isinstance(lrs, dict):
        return {k: v.detach() for k, v in lrs.items()}
    return [{k: v.detach() for k, v in step.items()} for step in lrs]


@LEARNERS.register("metasgd")
class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017, arXiv:1707.09835): MAML whose inner step is ``theta - alpha * grad`` with a
    learned ``alpha`` of the same shape as each adapted parameter.

    The rates live in ``self.learned_lrs`` (one entry per adapted parameter, initialised to
    ``config.inner_lr``); being module parameters, the outer Adam step meta-learns them with the backbone and
    checkpoints carry them. Evaluation adapts with the learned rates (first order, ``eval_steps``).
    """

    name = "metasgd"

    @classmethod
    def check_config(cls, config: AlgorithmConfig) -> AlgorithmConfig:
        """Meta-SGD's inner rule is SGD with its own learned rates, at training and at test time."""
        config = super().check_config(config)
        if config.inner_optimizer != "sgd":
            raise ValueError(f"algorithm.inner_optimizer must be sgd for metasgd (its inner step is theta - alpha * "
                             f"grad with learned alpha), got {config.inner_optimizer!r}")
        if config.eval_lr is not None:
            raise ValueError("algorithm.eval_lr must be null for metasgd: evaluation adapts with the learned "
                             "per-parameter rates (algorithm.inner_lr is only their initial value)")
        return config

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.learned_lrs = nn.ParameterDict({
            _lr_key(name): nn.Parameter(torch.full_like(p.detach(), self.config.inner_lr))
            for name, p in self.params().items()})

    def inner_lrs(self) -> Params:
        return {name: self.learned_lrs[_lr_key(name)] for name in self.params()}


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """MAML++'s multi-step loss weights of the query losses after inner steps ``1..steps`` in ``epoch`` (0-based).

    As the authors' code computes them (few_shot_learning_system.py ``get_per_step_loss_importance_vector``):
    every step starts at ``1 / steps``; each epoch moves ``1 / steps / msl_epochs`` of weight from every earlier
    step (down to at least ``0.03 / steps``) to the last one (up to at most ``1 - (steps - 1) * 0.03 / steps``).
    From epoch ``msl_epochs`` on only the last step counts (weight 1): the code's ``forward`` uses the weighted
    losses only "if ... epoch < self.args.multi_step_loss_num_epochs".
    """
    if epoch >= msl_epochs:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    earlier = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    last = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [*earlier, last]


def cosine_lr(epoch: int, epochs: float, lr: float, lr_min: float) -> float:
    """MAML++'s meta learning rate in ``epoch`` (0-based) of ``epochs``: ``torch.optim.lr_scheduler.
    CosineAnnealingLR(T_max=epochs, eta_min=lr_min)`` stepped once per epoch (the code's ``scheduler.step(epoch=
    epoch)``), i.e. ``lr_min + (lr - lr_min) * (1 + cos(pi * epoch / epochs)) / 2``."""
    return lr_min + (lr - lr_min) * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0


@LEARNERS.register("mamlpp")
class MAMLPlusPlus(MAML):
    """MAML++ (Antoniou, Edwards, Storkey, ICLR 2019, arXiv:1810.09502): MAML with five switches, each a key of
    ``AlgorithmConfig`` (all off: exactly MAML). Training counts epochs of ``steps_per_epoch`` meta-steps.

    - ``msl`` (MSL): the meta-loss is ``sum_i w_i * (query loss after inner step i)`` with :func:`msl_weights`
      for the first ``msl_epochs`` epochs (:meth:`step_weights`), then the last step's loss alone.
    - ``lslr`` (LSLR): one learned inner step size per adapted parameter tensor and per inner step,
      ``self.step_lrs[name]`` of shape ``[inner_steps]`` initialised to ``inner_lr`` and meta-learned by the outer
      Adam step; evaluation step ``i`` uses rate ``i`` (so ``eval_steps <= inner_steps``).
    - ``per_step_bn`` (BNWB + BNRS): the backbone's batch-norm weight and bias become ``[inner_steps, C]``
      (:func:`metabench.models.backbones.make_norm_per_step`, same parameter names, so ``functional_call``, every
      engine, the state dict and checkpoints carry them); inner step ``i`` and the query forward after it use row
      ``i - 1`` (the code indexes its per-step ``weight``/``bias`` by ``num_step`` in both), and evaluation with
      ``k`` steps scores the queries with row ``k - 1``. They are meta-learned, never adapted (``adapt_norm``
      must be false, as the code's ``enable_inner_loop_optimizable_bn_params: false``). Statistics: metabench's
      batch norm keeps no running statistics; every forward normalises with the statistics of its own batch,
      per step, at training and at test time (transductive, ``bn_mode``), which is what the authors' code
      computes too: its per-step running means are updated but its ``F.batch_norm(..., training=True, ...)``
      always normalises with the batch (HowToTrainYourMAMLPytorch issues #3 and #24). ``bn_mode`` works as for
      MAML (non-transductive: support set + one query per batch, with the last step's row).
    - ``first_order_epochs`` (DA): first order in epochs ``0 .. first_order_epochs - 1``, second order after (the
      code's ``first_order_to_second_order_epoch = E`` is ``first_order_epochs = E + 1``).
    - ``cosine_annealing`` (CA): the meta learning rate follows :func:`cosine_lr` from ``meta_lr`` to
      ``meta_lr_min`` over ``max_steps / steps_per_epoch`` epochs, constant within an epoch.
    """

    name = "mamlpp"
    config_keys = frozenset(MAMLPP_SWITCHES)

    @classmethod
    def check_config(cls, config: AlgorithmConfig) -> AlgorithmConfig:
        """The switches' combinations and the evaluation they imply."""
        config = super().check_config(config)
        if config.lslr and config.inner_optimizer != "sgd":
            raise ValueError(f"algorithm.inner_optimizer must be sgd with lslr (its inner step is theta - alpha * "
                             f"grad with learned alpha), got {config.inner_optimizer!r}")
        if config.lslr and config.eval_lr is not None:
            raise ValueError("algorithm.eval_lr must be null with lslr: evaluation adapts with the learned per-step "
                             "rates (algorithm.inner_lr is only their initial value)")
        if (config.lslr or config.per_step_bn) and config.eval_steps > config.inner_steps:
            raise ValueError(f"algorithm.eval_steps ({config.eval_steps}) must be <= inner_steps "
                             f"({config.inner_steps}) with lslr or per_step_bn: evaluation step i uses training step "
                             "i's rates and batch norm")
        if config.per_step_bn and config.adapt_norm:
            raise ValueError("algorithm.per_step_bn needs adapt_norm=false: the per-step batch-norm weights and "
                             "biases are meta-learned, one set per inner step, and never adapted in the inner loop")
        return config

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.per_step_names = make_norm_per_step(self.backbone, cfg.inner_steps) if cfg.per_step_bn else []
        self.step_lrs = nn.ParameterDict({
            _lr_key(name): nn.Parameter(torch.full((cfg.inner_steps,), cfg.inner_lr, dtype=p.dtype))
            for name, p in self.params().items()} if cfg.lslr else {})

    def epoch(self) -> int:
        """The training epoch (0-based) of the current meta-step."""
        return int(self.global_step) // self.config.steps_per_epoch

    def inner_lrs(self) -> list[Params] | None:
        if not self.config.lslr:
            return None
        names = list(self.params())
        return [{name: self.step_lrs[_lr_key(name)][i] for name in names} for i in range(self.config.inner_steps)]

    def step_params(self) -> Params | None:
        if not self.per_step_names:
            return None
        named = dict(self.backbone.named_parameters())
        return {name: named[name] for name in self.per_step_names}

    def step_weights(self) -> list[float] | None:
        """MSL's weights in the current epoch; None (the last step's loss alone, MAML's objective) without MSL or
        once its epochs are over, when the weights would be ``[0, ..., 0, 1]``."""
        if not self.config.msl or self.epoch() >= self.config.msl_epochs:
            return None
        return msl_weights(self.config.inner_steps, self.epoch(), self.config.msl_epochs)

    def inner_config(self, training: bool) -> InnerConfig:
        config = super().inner_config(training)
        if training and self.epoch() < self.config.first_order_epochs:  # DA: first order before the switch
            config = dataclasses.replace(config, first_order=True)
        return config

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()  # Adam(meta_lr) over everything: backbone, rates, batch norm
        if not self.config.cosine_annealing:
            return optimizer
        cfg, epochs = self.config, self.max_steps / self.config.steps_per_epoch

        def factor(step: int) -> float:  # LambdaLR multiplies meta_lr by this at meta-step ``step``
            return cosine_lr(step // cfg.steps_per_epoch, epochs, cfg.meta_lr, cfg.meta_lr_min) / cfg.meta_lr

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@LEARNERS.register("reptile")
class Reptile(MetaLearner):
    """Reptile (Nichol et al. 2018): move the initialization towards the mean of the adapted parameters.

    ``inner_state: persistent`` keeps Reptile's code's one Adam state (:class:`InnerState`): in training the tasks
    of a meta-batch adapt one after another, each starting from the state the previous one left, and the state runs
    on across meta-iterations (checkpointed with the run); every evaluation episode starts from the state reached
    so far and does not pass it on.
    """

    name = "reptile"
    capabilities = Capabilities(inner_loop=True, ddp_exact=True)
    config_keys = frozenset({"inner_state"})

    @classmethod
    def check_config(cls, config: AlgorithmConfig) -> AlgorithmConfig:
        """Reptile's outer step follows the adapted parameters only: whatever the inner loop leaves alone would
        never leave its initialization."""
        config = super().check_config(config)
        if config.adapt is not None:
            raise ValueError("algorithm.adapt is not supported by reptile: its outer step follows the adapted "
                             "parameters only, so the frozen ones would never leave their initialization")
        if not config.adapt_norm:
            raise ValueError("algorithm.adapt_norm=false is not supported by reptile: its outer step follows the "
                             "adapted parameters only, so batch norm would never leave its initialization")
        return config

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.adam_state = InnerState.fresh()  # used with inner_state: persistent only

    @property
    def persistent(self) -> bool:
        return self.config.inner_state == "persistent"

    def inner_start_state(self) -> InnerState | None:
        return self.adam_state.to(self.device) if self.persistent else None

    def adapt_in_sequence(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, config: InnerConfig) -> Params:
        """Adapt the tasks one after another, the inner Adam state passed from each task to the next and kept
        for the next meta-iteration (``[T, *shape]`` adapted parameters, as ``adapt_tasks``)."""
        state = self.inner_start_state()
        per_task = []
        for x, y in zip(sx, sy):
            adapted, state = adapt_with_state(params, self.task_loss, x, y, config, state=state)
            per_task.append(adapted)
        assert state is not None
        self.adam_state = state.detached()
        return {k: torch.stack([a[k] for a in per_task]) for k in params}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.persistent:
            state = self.adam_state.to("cpu")
            checkpoint["metabench_inner_state"] = {"m": state.m, "v": state.v, "count": state.count}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("metabench_inner_state")
        if saved is not None:
            self.adam_state = InnerState(dict(saved["m"]), dict(saved["v"]), int(saved["count"]))

    def inner_minibatches(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split each task's support set into ``inner_steps`` minibatches of ``inner_batch`` images, cycling
        through a shuffled order (``[T, n, ...]`` -> ``[T, steps, batch, ...]``). The order depends only on the
        step number, so a resumed run draws the same minibatches."""
        steps, size, n = self.config.inner_steps, self.config.inner_batch, x.shape[1]
        generator = torch.Generator().manual_seed(int(self.global_step))
        order = torch.randperm(n, generator=generator)
        rows = order[torch.arange(steps * size) % n].reshape(steps, size).to(x.device)
        return x[:, rows], y[:, rows]

    def training_step(self, batch: MetaBatch, batch_idx: int) -> None:
        sx, sy, qx, qy = self._inputs(batch)
        params = {k: v.detach() for k, v in self.params().items()}
        config = self.inner_config(True)
        if self.config.inner_batch is not None:
            sx, sy = self.inner_minibatches(sx, sy)
            config = dataclasses.replace(config, per_step_batches=True)
        start = self.inner_start_state()
        engine = self._resolve_engine(lambda e: adapt_tasks(params, self.task_loss, sx, sy, config, e, state=start))
        if self.persistent:  # exactness: each task starts from the state the previous one left
            adapted = self.adapt_in_sequence(params, sx, sy, config)
        else:
            adapted = adapt_tasks(params, self.task_loss, sx, sy, config, engine)
        with torch.no_grad():
            outputs = task_outputs(self.backbone, adapted, qx, engine)
            loss = self.problem.loss(outputs.flatten(0, 1), qy.flatten(0, 1))  # equal-sized tasks: the task mean
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for name, p in self.backbone.named_parameters():
            p.grad = p.detach() - adapted[name].detach().mean(0)  # SGD(lr=eps) then gives the Reptile step
        # Several processes: theta - (mean adapted over ALL tasks), i.e. the outer step averages every rank's tasks.
        self.sync_meta_gradient(loss, sx.shape[0])
        optimizer.step()
        self.lr_schedulers().step()
        self._log_train(loss, outputs, qy)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.config.meta_lr)
        final = (self.config.meta_lr_final or 0.0) / self.config.meta_lr
        total = max(self.max_steps, 1)

        def anneal(step: int) -> float:  # linear from meta_lr to meta_lr_final over max_steps
            return 1.0 + (final - 1.0) * min(step, total) / total

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, anneal)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FineTuning(MetaLearner):
    """The fine-tuning baselines' one training loop: plain supervised pre-training, then fine-tuning at test time.

    A training step is one optimizer step on the problem's loss of the network's outputs for a labelled batch,
    ``supervised_batch(batch) -> (x, y, groups)``: nothing is learned across episodes. Adam with ``meta_lr``,
    multiplied by ``lr_decay_factor`` every ``lr_decay_every`` steps when that is set. The subclasses differ in
    where the labelled batch comes from and in what is fine-tuned on each test episode's support set:
    :class:`Transfer` (every image of the training episodes; the network, through the inner loop) and
    ``baseline`` / ``baseline++`` (``models/baselines.py``: ordinary mini-batches of the training split with its
    class labels; a new head on the frozen features).
    """

    def supervised_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Inputs ``[B, ...]``, targets ``[B, ...]`` and how to group the B rows for the logged train score
        (``[*groups] == [B]``: e.g. ``(tasks, images per task)``)."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, groups = self.supervised_batch(batch)
        outputs = self.backbone(x)
        loss = self.problem.loss(outputs, y)
        self._check_finite(loss)
        self._log_train(loss, outputs.detach().unflatten(0, groups), y.unflatten(0, groups))
        return loss

    def configure_optimizers(self):
        return adam_with_step_decay(self.parameters(), self.config)


def adam_with_step_decay(parameters, config: AlgorithmConfig):
    """Adam with ``config.meta_lr``; with ``config.lr_decay_every`` also a per-step StepLR (factor
    ``lr_decay_factor``), in Lightning's optimizer-and-scheduler form."""
    optimizer = torch.optim.Adam(parameters, lr=config.meta_lr)
    if config.lr_decay_every is None:
        return optimizer
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_decay_every, gamma=config.lr_decay_factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@LEARNERS.register("transfer")
class Transfer(FineTuning):
    """The fine-tuning baseline of segmentation: pre-train the initialization by plain supervised learning on the
    training classes, then fine-tune on each test episode's support set with the same evaluation steps as the
    meta-learners (``MetaLearner.evaluate_outputs``).

    A training step is one Adam step (``meta_lr``) on the problem's loss over every support and query image of
    the meta-batch (all tasks in one batch). Episode labels must mean the same thing in every episode, i.e.
    be class-agnostic: 1-way segmentation (0 background, 1 foreground). With N-way labels, label ``l`` would
    be a different class in every episode and pre-training would learn nothing (``baseline`` pre-trains on the
    training split's own class labels instead).
    """

    name = "transfer"
    config_keys = frozenset({"lr_decay_every"})

    def __init__(self, backbone: nn.Module, problem: Problem, config: AlgorithmConfig, max_steps: int) -> None:
        if not isinstance(problem, Segmentation):
            raise ValueError("transfer needs class-agnostic labels: it is defined for 1-way segmentation only, "
                             f"not for {type(problem).__name__.lower()} (episode labels are re-drawn per episode)")
        if getattr(backbone, "ways", 1) != 1:  # the network is built for the episodes' ways
            raise ValueError(f"transfer needs 1-way episodes (class-agnostic foreground), the network has "
                             f"{backbone.ways} ways")
        super().__init__(backbone, problem, config, max_steps)

    def supervised_batch(self, batch: MetaBatch) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        sx, sy, qx, qy = self._inputs(batch)
        x = torch.cat([sx, qx], dim=1)  # [T, n + m, C, H, W]
        y = torch.cat([sy, qy], dim=1)
        return x.flatten(0, 1), y.flatten(0, 1), tuple(x.shape[:2])


def adapted_parameter_names(backbone: nn.Module, prefixes: list[str] | None,
                            adapt_norm: bool = True) -> frozenset[str]:
    """Names of the parameters whose name is, or starts with, one of ``prefixes`` + "." (all if ``None``),
    less the batch-norm parameters when ``adapt_norm`` is false.

    Raises:
        ValueError: a prefix matches no parameter (the message lists the network's top-level names), or
            nothing is left to adapt.
    """
    names = [name for name, _ in backbone.named_parameters()]
    if not adapt_norm:
        norms = {f"{m}.{p}" if m else p for m, module in backbone.named_modules() if is_norm(module)
                 for p, _ in module.named_parameters(recurse=False)}
        names = [n for n in names if n not in norms]
        if not names:
            raise ValueError(f"algorithm.adapt_norm=false leaves no parameter of {type(backbone).__name__} to adapt")
    if prefixes is None:
        return frozenset(names)
    chosen: set[str] = set()
    for prefix in prefixes:
        hits = {n for n in names if n == prefix or n.startswith(prefix.rstrip(".") + ".")}
        if not hits:
            tops = sorted({n.split(".", 1)[0] for n in names})
            raise ValueError(f"algorithm.adapt: prefix {prefix!r} matches no parameter of "
                             f"{type(backbone).__name__}; its top-level names: {', '.join(tops)}")
        chosen |= hits
    return frozenset(chosen)
