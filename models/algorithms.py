"""MAML, FOMAML, ANIL, Meta-SGD and Reptile as Lightning modules, all on the ONE functional inner loop
(``inner_loop``).

- MAML: meta-loss = mean over tasks of the query loss at the adapted parameters; gradients flow through
  the inner steps (second order). FOMAML is the same module with ``first_order`` (inner gradients detached).
- ANIL (Raghu et al. 2020): the same module with ``config.adapt = ["head"]``: the inner loop adapts the head
  only, the outer step trains everything (second order through the head's adaptation).
- Meta-SGD (Li et al. 2017): the MAML module plus a learned inner step size per parameter entry (the inner
  step is ``theta - alpha * grad`` elementwise), meta-learned by the same outer Adam step; evaluation adapts
  with the learned rates.
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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from metabench.datasets.episodes import MetaBatch
from metabench.models.backbones import is_norm
from metabench.models.hparams import AlgorithmConfig
from metabench.models.inner_loop import (
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
    task_outputs,
)
from metabench.models.problems import Classification, Segmentation
from metabench.stats import mean_ci95

Problem = Classification | Segmentation


class DivergenceError(RuntimeError):
    """The meta-loss became NaN or infinite; training stops and the last good checkpoint is kept."""


class MetaLearner(L.LightningModule):
    """Shared evaluation, logging and adaptation for every gradient-based meta-learner."""

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

    # -- shared pieces ---------------------------------------------------------------------------------------

    def inner_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The adaptation loss: the problem's mean loss times ``inner_loss_scale`` (see AlgorithmConfig)."""
        return self.problem.loss(outputs, targets) * self.config.inner_loss_scale

    def params(self) -> Params:
        """The parameters the inner loop adapts (all of them unless ``config.adapt`` names prefixes).

        Parameters left out are not passed to ``functional_call``, which then reads them from the module: they
        stay fixed during adaptation but remain in the outer autograd graph (MAML trains them through it).
        """
        return {k: v for k, v in self.backbone.named_parameters() if k in self.adapted_names}

    def _resolve_engine(self, probe: Callable[[str], object] | None = None) -> str:
        """The engine to run now. A configured engine is returned as is. For "auto": on the first training step
        (``probe`` given) every candidate of ``engine_candidates`` is timed once on the real meta-batch by
        ``probe(engine)`` (side-effect free: meta-gradient discarded, no optimizer step) and the fastest is kept
        for the rest of the run; before that (e.g. Lightning's sanity validation) ``default_engine`` is used
        without fixing the choice. Which engine wins depends on device AND protocol (see benchmarks/README.md).
        """
        if self.engine != "auto":
            return self.engine
        if probe is None:
            return default_engine(self.device)
        self.engine, self.engine_timings = choose_engine(probe, engine_candidates(self.device, self.backbone),
                                                         self.device)
        return self.engine

    # "auto" is timed once per run: a resumed run keeps the engine its first step chose (the engines agree only
    # up to float rounding, so switching mid-run would make a resumed run differ from an uninterrupted one).
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["metabench_engine"] = {"engine": self.engine, "timings": dict(self.engine_timings)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("metabench_engine", {})
        if self.config.engine == "auto" and saved.get("engine", "auto") != "auto":
            self.engine, self.engine_timings = saved["engine"], dict(saved.get("timings", {}))

    def inner_lrs(self) -> Params | None:
        """Per-parameter inner step sizes (Meta-SGD), keyed like :meth:`params`; None: the scalar
        ``inner_lr`` / ``eval_lr`` of :meth:`inner_config`."""
        return None

    def inner_config(self, training: bool) -> InnerConfig:
        cfg = self.config
        if training:
            return InnerConfig(cfg.inner_steps, cfg.inner_lr, cfg.first_order, cfg.inner_optimizer)
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

    def evaluate_outputs(self, batch: MetaBatch) -> torch.Tensor:
        """Query outputs ``[T, m, ...]`` after adapting on each episode's support set (evaluation steps)."""
        engine = self._resolve_engine()
        sx, sy, qx, qy = self._inputs(batch)
        params = {k: v.detach() for k, v in self.params().items()}
        lrs = self.inner_lrs()
        lrs = None if lrs is None else {k: v.detach() for k, v in lrs.items()}
        with torch.enable_grad():  # Lightning evaluates under no_grad; adaptation needs gradients
            adapted = adapt_tasks(params, self.task_loss, sx, sy, self.inner_config(False), engine, lrs)
        with torch.no_grad():
            adapted = {k: v.detach() for k, v in adapted.items()}
            if self.config.bn_mode == "transductive":
                outputs = task_outputs(self.backbone, adapted, qx, engine)
            else:
                outputs = non_transductive_outputs(self.backbone, adapted, sx, qx, engine)
            return outputs

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
        scores = torch.cat(self._scores[stage]) if self._scores[stage] else torch.empty(0)
        stats = self._stats[stage]
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


class MAML(MetaLearner):
    """MAML (Finn et al. 2017); with ``config.name == "fomaml"`` the first-order approximation, with "anil" the
    head-only inner loop (``config.adapt``); :class:`MetaSGD` adds learned inner rates (``inner_lrs``).

    With ``config.task_chunk`` the meta-gradient is back-propagated that many tasks at a time inside the step
    (``inner_loop.meta_backward``: same gradient, the memory of one chunk), which needs manual optimization:
    Lightning's automatic loop would call ``backward`` on the returned loss once more.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = self.config.task_chunk is None

    def training_step(self, batch: MetaBatch, batch_idx: int) -> torch.Tensor | None:
        sx, sy, qx, qy = self._inputs(batch)
        params, config, lrs = self.params(), self.inner_config(True), self.inner_lrs()
        learned = [*params.values(), *(lrs or {}).values()]

        def probe(engine: str) -> None:  # "auto": one meta-gradient per candidate, discarded
            chunk = self.config.task_chunk or sx.shape[0]  # in the step's chunks: the probe keeps its memory cap
            for start in range(0, sx.shape[0], chunk):
                part = slice(start, start + chunk)
                probe_loss, _ = meta_loss(self.backbone, params, self.inner_loss, sx[part], sy[part], qx[part],
                                          qy[part], config, engine, lrs)
                torch.autograd.grad(probe_loss, learned, allow_unused=True)

        engine = self._resolve_engine(probe)
        if self.automatic_optimization:
            loss, outputs = meta_loss(self.backbone, params, self.inner_loss, sx, sy, qx, qy, config, engine, lrs)
            self._check_finite(loss)
            self._log_train(loss / self.config.inner_loss_scale, outputs, qy)  # comparable across algorithms
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss, outputs = meta_backward(self.backbone, params, self.inner_loss, sx, sy, qx, qy, config, engine,
                                      self.config.task_chunk, lrs)
        self._check_finite(loss)  # before the step: a diverged meta-gradient never reaches the parameters
        optimizer.step()
        self._log_train(loss / self.config.inner_loss_scale, outputs, qy)
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.config.meta_lr)  # with Meta-SGD: the rates too


def _lr_key(name: str) -> str:
    """A parameter name as a ParameterDict key (which may not contain ".")."""
    return name.replace(".", "/")


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017, arXiv:1707.09835): MAML whose inner step is ``theta - alpha * grad`` with a
    learned ``alpha`` of the same shape as each adapted parameter.

    The rates live in ``self.learned_lrs`` (one entry per adapted parameter, initialised to
    ``config.inner_lr``); being module parameters, the outer Adam step meta-learns them with the backbone and
    checkpoints carry them. Evaluation adapts with the learned rates (first order, ``eval_steps``).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.learned_lrs = nn.ParameterDict({
            _lr_key(name): nn.Parameter(torch.full_like(p.detach(), self.config.inner_lr))
            for name, p in self.params().items()})

    def inner_lrs(self) -> Params:
        return {name: self.learned_lrs[_lr_key(name)] for name in self.params()}


class Reptile(MetaLearner):
    """Reptile (Nichol et al. 2018): move the initialization towards the mean of the adapted parameters."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

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
        engine = self._resolve_engine(lambda e: adapt_tasks(params, self.task_loss, sx, sy, config, e))
        adapted = adapt_tasks(params, self.task_loss, sx, sy, config, engine)
        with torch.no_grad():
            outputs = task_outputs(self.backbone, adapted, qx, engine)
            loss = self.problem.loss(outputs.flatten(0, 1), qy.flatten(0, 1))  # equal-sized tasks: the task mean
        self._check_finite(loss)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for name, p in self.backbone.named_parameters():
            p.grad = p.detach() - adapted[name].detach().mean(0)  # SGD(lr=eps) then gives the Reptile step
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


MODULES: dict[str, type[MetaLearner]] = {"maml": MAML, "fomaml": MAML, "anil": MAML, "metasgd": MetaSGD,
                                         "reptile": Reptile, "transfer": Transfer}


def build_algorithm(backbone: nn.Module, problem: Problem, config: AlgorithmConfig,
                    max_steps: int) -> MetaLearner:
    """The Lightning module for ``config.name``: a plain registry lookup in :data:`MODULES` and in
    ``models/baselines.py``'s ``BASELINES`` (protonet, baseline, baseline++), imported here because it imports this
    module (its classes subclass :class:`MetaLearner`)."""
    from metabench.models.baselines import BASELINES

    return {**MODULES, **BASELINES}[config.name](backbone, problem, config, max_steps)
