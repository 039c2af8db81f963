"""MAML, FOMAML and Reptile as Lightning modules, all on the ONE functional inner loop (``inner_loop``).

- MAML: meta-loss = mean over tasks of the query loss at the adapted parameters; gradients flow through
  the inner steps (second order). FOMAML is the same module with ``first_order`` (inner gradients detached).
- Reptile (Nichol et al. 2018): k inner steps (SGD or Adam with beta1 = 0) per task, then
  ``theta <- theta + eps * (mean adapted - theta)``. It is written as plain SGD with learning rate ``eps``
  on the "gradient" ``theta - mean adapted``, so Lightning counts steps, checkpoints the optimizer and
  anneals ``eps`` linearly with an LR scheduler. Meta-batch 1 is the paper's serial version, > 1 its
  batched version.
- Evaluation adapts on each fixed episode's support set with the evaluation steps (always first order:
  no meta-gradient is needed) and scores the queries; batch-norm statistics come from the query batch
  ("transductive", as the MAML code) or from the support set plus one query ("non-transductive").
"""

from __future__ import annotations

import dataclasses

import lightning as L
import torch
from torch import nn

from metabench.datasets.episodes import MetaBatch
from metabench.models.hparams import AlgorithmConfig
from metabench.models.inner_loop import (InnerConfig, Params, adapt_tasks, default_engine, functional_loss,
                                         meta_loss, non_transductive_outputs, task_outputs)
from metabench.models.problems import Classification, mean_ci95

class DivergenceError(RuntimeError):
    """The meta-loss became NaN or infinite; training stops and the last good checkpoint is kept."""


class MetaLearner(L.LightningModule):
    """Shared evaluation, logging and adaptation for every gradient-based meta-learner."""

    def __init__(self, backbone: nn.Module, problem: Classification, config: AlgorithmConfig,
                 max_steps: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.problem = problem
        self.config = config
        self.max_steps = max_steps
        self.engine = config.engine
        self.task_loss = functional_loss(backbone, self.inner_loss)
        self._scores: dict[str, list[torch.Tensor]] = {"val": [], "test": []}
        self.test_scores: torch.Tensor | None = None  # per-episode scores of the last test run, in order

    # -- shared pieces ---------------------------------------------------------------------------------------

    def inner_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The adaptation loss: the problem's mean loss times ``inner_loss_scale`` (see AlgorithmConfig)."""
        return self.problem.loss(outputs, targets) * self.config.inner_loss_scale

    def params(self) -> Params:
        return dict(self.backbone.named_parameters())

    def _resolve_engine(self) -> str:
        if self.engine == "auto":
            self.engine = default_engine(self.device)
        return self.engine

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

    def evaluate(self, batch: MetaBatch) -> torch.Tensor:
        """Adapt on each episode's support set with the evaluation steps; per-episode query scores ``[T]``."""
        engine = self._resolve_engine()
        sx, sy, qx, qy = self._inputs(batch)
        params = {k: v.detach() for k, v in self.params().items()}
        with torch.enable_grad():  # Lightning evaluates under no_grad; adaptation needs gradients
            adapted = adapt_tasks(params, self.task_loss, sx, sy, self.inner_config(False), engine)
        with torch.no_grad():
            adapted = {k: v.detach() for k, v in adapted.items()}
            if self.config.bn_mode == "transductive":
                outputs = task_outputs(self.backbone, adapted, qx, engine)
            else:
                outputs = non_transductive_outputs(self.backbone, adapted, sx, qx, engine)
            return self.problem.episode_scores(outputs, qy)

    def validation_step(self, batch: MetaBatch, batch_idx: int) -> None:
        self._scores["val"].append(self.evaluate(batch).cpu())

    def test_step(self, batch: MetaBatch, batch_idx: int) -> None:
        self._scores["test"].append(self.evaluate(batch).cpu())

    def _close_eval(self, stage: str) -> torch.Tensor:
        scores = torch.cat(self._scores[stage]) if self._scores[stage] else torch.empty(0)
        self._scores[stage] = []
        if scores.numel():
            mean, ci = mean_ci95(scores.tolist())
            name = self.problem.metric_name
            self.log(f"{stage}/{name}", mean, prog_bar=True)
            self.log(f"{stage}/{name}_ci95", ci)
        return scores

    def on_validation_epoch_end(self) -> None:
        self._close_eval("val")

    def on_test_epoch_end(self) -> None:
        self.test_scores = self._close_eval("test")

    def _log_train(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log(f"train/{self.problem.metric_name}", self.problem.episode_scores(outputs, targets).mean(),
                 prog_bar=True)


class MAML(MetaLearner):
    """MAML (Finn et al. 2017); with ``config.name == "fomaml"`` the first-order approximation."""

    def training_step(self, batch: MetaBatch, batch_idx: int) -> torch.Tensor:
        sx, sy, qx, qy = self._inputs(batch)
        loss, outputs = meta_loss(self.backbone, self.params(), self.inner_loss, sx, sy, qx, qy,
                                  self.inner_config(True), self._resolve_engine())
        self._check_finite(loss)
        self._log_train(loss, outputs, qy)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.config.meta_lr)


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
        engine = self._resolve_engine()
        params = {k: v.detach() for k, v in self.params().items()}
        config = self.inner_config(True)
        if self.config.inner_batch is not None:
            sx, sy = self.inner_minibatches(sx, sy)
            config = dataclasses.replace(config, per_step_batches=True)
        adapted = adapt_tasks(params, self.task_loss, sx, sy, config, engine)
        with torch.no_grad():
            outputs = task_outputs(self.backbone, adapted, qx, engine)
            loss = self.problem.loss(outputs.flatten(0, 1), qy.flatten())  # tasks are equal-sized: the task mean
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


MODULES: dict[str, type[MetaLearner]] = {"maml": MAML, "fomaml": MAML, "reptile": Reptile}


def build_algorithm(backbone: nn.Module, problem: Classification, config: AlgorithmConfig,
                    max_steps: int) -> MetaLearner:
    """The Lightning module for ``config.name`` (a plain registry lookup)."""
    return MODULES[config.name](backbone, problem, config, max_steps)
