"""The baselines every few-shot table has, at the suite's one test path: Prototypical Networks, Baseline, Baseline++.

- ``protonet`` (Snell, Swersky, Zemel 2017, arXiv:1703.05175): a class's prototype is the mean embedding of its
  support images, a query's logits are the negative squared Euclidean distances to the prototypes. Trained
  episodically (any number of training ways: ``episodes.train_ways``) with Adam, the learning rate cut by
  ``lr_decay_factor`` every ``lr_decay_every`` episodes, optionally stopped early on the validation loss
  (``patience``; the best validation weights are kept). Nothing is adapted at test time.
- ``baseline`` / ``baseline++`` (Chen, Liu, Kira, Wang, Huang 2019, arXiv:1904.04232): the network with a head over
  all training classes (a linear layer; Baseline++: a cosine classifier) is pre-trained by ordinary supervised
  learning on mini-batches of the training split, labelled with the split's class indices (``datasets/supervised.py``
  draws them: not episodes). On each test episode the network is frozen, its features are computed once, a new
  head of the episode's ways (linear, or cosine) is fitted to the support features with the authors' recipe
  (``algorithm.finetune``) and scores the queries. The training loop is :class:`~metabench.models.algorithms.
  FineTuning`, shared with the segmentation ``transfer`` baseline: one concept (pre-train, then fine-tune at test
  time), two choices of what is fine-tuned.

All three are :class:`~metabench.models.algorithms.MetaLearner` subclasses: validation and test run on the same
fixed episodes, give per-episode scores and the same record schema, and the record's random-init column is the
same test procedure from the run's own initialization. They read the network's features through its ``embed``
method (Conv4, the MLP and ResNet-12 have one); its ``head`` is unused by ProtoNet and is the pre-training
classifier of the baselines.

Batch norm (buffer-free, batch statistics) at evaluation: ``bn_mode: transductive`` embeds each episode's support
and query images as one batch (as ProtoNet's code does in training); ``non-transductive`` embeds the support set
alone and every query in a batch with the support set (each query classified on its own, as the authors' running
statistics at test time do).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from metabench.datasets.episodes import MetaBatch
from metabench.models.algorithms import LEARNERS, FineTuning, MetaLearner, Problem, adam_with_step_decay
from metabench.models.hparams import AlgorithmConfig, Capabilities, FinetuneConfig
from metabench.models.inner_loop import Params
from metabench.models.norm import is_norm
from metabench.models.problems import Classification

Embed = Callable[[Tensor], Tensor]
NORM_EPS = 1e-5  # Baseline++'s feature normalisation: x / (||x|| + 1e-5) (CloserLookFewShot distLinear)


# -- prototypes -----------------------------------------------------------------------------------------------


def prototypes(z: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Mean embedding of each class: ``z [n, D]``, ``labels [n]`` in ``0..ways-1`` -> ``[ways, D]``."""
    onehot = F.one_hot(labels, ways).to(z.dtype)  # [n, ways]
    return (onehot.T @ z) / onehot.sum(0).unsqueeze(1)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``||a_i - b_j||^2`` for ``a [m, D]``, ``b [k, D]`` -> ``[m, k]``, without an ``[m, k, D]`` temporary (the
    flattened ResNet-12 features are 16,000-dimensional)."""
    return a.square().sum(-1, keepdim=True) - 2.0 * (a @ b.T) + b.square().sum(-1)


def prototype_logits(support: Tensor, labels: Tensor, query: Tensor, ways: int) -> Tensor:
    """ProtoNet's logits: minus the squared Euclidean distance of each query embedding ``[m, D]`` to each class's
    prototype (from ``support [n, D]``, ``labels [n]``) -> ``[m, ways]``."""
    return -squared_distances(query, prototypes(support, labels, ways))


def episode_features(embed: Embed, support_x: Tensor, query_x: Tensor, bn_mode: str) -> tuple[Tensor, Tensor]:
    """Features of every episode's support ``[T, n, ...]`` and query ``[T, m, ...]`` images -> ``[T, n, D]``,
    ``[T, m, D]``, with batch statistics as ``bn_mode`` says (see the module docstring)."""
    support, query = [], []
    for sx, qx in zip(support_x, query_x):
        if bn_mode == "transductive":
            z = embed(torch.cat([sx, qx]))
            support.append(z[:sx.shape[0]])
            query.append(z[sx.shape[0]:])
        else:  # each query in its own batch with the support set (vectorised over the queries)
            support.append(embed(sx))
            query.append(vmap(lambda q, s=sx: embed(torch.cat([s, q.unsqueeze(0)]))[-1])(qx))
    return torch.stack(support), torch.stack(query)


# -- heads: linear and cosine -----------------------------------------------------------------------------------


def chen_scale(classes: int) -> float:
    """Baseline++'s fixed logit scale in the authors' code (backbone.py ``distLinear``): 2 for at most 200 classes,
    else 10 ("in omniglot, a larger scale factor is required to handle >1000 output classes")."""
    return 2.0 if classes <= 200 else 10.0


def cosine_logits(z: Tensor, weight: Tensor, gain: Tensor, scale: float) -> Tensor:
    """Baseline++'s head: ``scale * <z / (||z|| + 1e-5), gain_c * weight_c / ||weight_c||>`` for every class c.

    ``z [..., D]``, ``weight [..., C, D]`` (the direction), ``gain [..., C]`` -> ``[..., C]``. The class-wise
    learnable norm ``gain`` is the weight normalisation of the authors' code (``WeightNorm.apply(self.L, 'weight',
    dim=0)``, ``class_wise_learnable_norm = True``); at initialisation it equals ``||weight_c||``.
    """
    features = z / (z.norm(dim=-1, keepdim=True) + NORM_EPS)
    classes = gain.unsqueeze(-1) * weight / weight.norm(dim=-1, keepdim=True)
    return scale * features @ classes.transpose(-1, -2)


class CosineClassifier(nn.Module):
    """Baseline++'s pre-training head over the training classes (:func:`cosine_logits`; no bias).

    Init as ``nn.Linear(D, C, bias=False)`` then weight normalisation: direction U(-1/sqrt(D), 1/sqrt(D)), gain its
    row norm.
    """

    def __init__(self, in_features: int, classes: int, scale: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, classes, scale
        weight = torch.empty(classes, in_features)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default init
        self.weight = nn.Parameter(weight)
        self.gain = nn.Parameter(weight.norm(dim=1))

    def forward(self, z: Tensor) -> Tensor:
        return cosine_logits(z, self.weight, self.gain, self.scale)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scale={self.scale}"


def init_heads(tasks: int, ways: int, dim: int, cosine: bool, generator: torch.Generator,
               like: Tensor) -> Params:
    """A fresh head per task as the authors' fine-tuning creates one (``nn.Linear(D, ways)``, or ``distLinear``):
    weight (and bias) U(-1/sqrt(D), 1/sqrt(D)); the cosine head's gain = the weight's row norm. Drawn from
    ``generator`` on the CPU, returned like ``like`` (dtype, device), as leaves requiring grad."""
    bound = 1.0 / math.sqrt(dim)
    weight = (2.0 * torch.rand(tasks, ways, dim, generator=generator, dtype=torch.float64) - 1.0) * bound
    if cosine:
        params = {"weight": weight, "gain": weight.norm(dim=-1)}
    else:
        params = {"weight": weight,
                  "bias": (2.0 * torch.rand(tasks, ways, generator=generator, dtype=torch.float64) - 1.0) * bound}
    return {k: v.to(like).requires_grad_() for k, v in params.items()}


def head_logits(params: Params, z: Tensor, scale: float | None = None) -> Tensor:
    """Per-task head outputs: ``params`` ``[T, ...]`` (linear: weight, bias; cosine: weight, gain and ``scale``),
    ``z [T, b, D]`` -> ``[T, b, ways]``."""
    if "gain" in params:
        return cosine_logits(z, params["weight"], params["gain"], scale)
    return torch.baddbmm(params["bias"].unsqueeze(1), z, params["weight"].transpose(1, 2))


def support_order(generator: torch.Generator, tasks: int, n: int) -> Tensor:
    """One random order of the ``n`` support rows per task, ``[T, n]`` (an epoch of head fine-tuning)."""
    return torch.argsort(torch.rand(tasks, n, generator=generator), dim=1)


def finetune_heads(support: Tensor, labels: Tensor, ways: int, recipe: FinetuneConfig, generator: torch.Generator,
                   cosine: bool = False, scale: float | None = None) -> Params:
    """Fit a new head per task to frozen support features, all tasks at once.

    ``support [T, n, D]`` (no gradient reaches it), ``labels [T, n]``. The authors' loop, vectorised over tasks
    (CloserLookFewShot methods/baselinefinetune.py ``set_forward_adaptation``): ``recipe.epochs`` passes over the
    support set in a fresh random order, in mini-batches of ``recipe.batch_size`` (the last one smaller), each one
    ``torch.optim.SGD`` step (momentum, dampening, weight decay) on the mini-batch's mean cross-entropy. Tasks
    share no parameter, so one gradient of the summed task losses gives
    every task its own step. Returns the heads ``[T, ...]`` (detached).
    """
    tasks, n, dim = support.shape
    support = support.detach()
    params = init_heads(tasks, ways, dim, cosine, generator, support)
    # torch.optim.SGD itself: its update is elementwise, so on the stacked [T, ...] heads it is each task's own SGD.
    optimizer = torch.optim.SGD(params.values(), lr=recipe.lr, momentum=recipe.momentum,
                                dampening=recipe.dampening, weight_decay=recipe.weight_decay)
    for _ in range(recipe.epochs):
        order = support_order(generator, tasks, n).to(support.device)
        for start in range(0, n, recipe.batch_size):
            rows = order[:, start:start + recipe.batch_size]
            z = torch.gather(support, 1, rows.unsqueeze(-1).expand(-1, -1, dim))
            y = torch.gather(labels, 1, rows)
            logits = head_logits(params, z, scale)
            loss = F.cross_entropy(logits.reshape(-1, ways), y.reshape(-1), reduction="none")
            optimizer.zero_grad(set_to_none=True)
            loss.view(tasks, -1).mean(1).sum().backward()
            optimizer.step()
    return {k: v.detach() for k, v in params.items()}


def use_native_norm(backbone: nn.Module) -> None:
    """Switch the network's batch norm to the native fused kernel (``BatchNorm2d.native``): these learners never
    differentiate through a functional inner loop, and it makes their steps ~1.5x faster on CPU."""
    for module in backbone.modules():
        if is_norm(module):
            module.native = True


def _check_classification(name: str, backbone: nn.Module, problem: Problem) -> None:
    if not isinstance(problem, Classification):
        raise ValueError(f"{name} is defined for classification only, not for {type(problem).__name__.lower()}")
    if not callable(getattr(backbone, "embed", None)):
        raise ValueError(f"{name} needs the network's features: {type(backbone).__name__} has no embed() method "
                         "(Conv4, the MLP and ResNet-12 have one)")


# -- ProtoNet ---------------------------------------------------------------------------------------------------


@LEARNERS.register("protonet")
class ProtoNet(MetaLearner):
    """Prototypical Networks (Snell et al. 2017); see the module docstring.

    A training step is one optimizer step on the mean query cross-entropy of ``meta_batch`` episodes, each episode's
    support and query images embedded as one batch (the authors' code: ``x = torch.cat([xs, xq])``,
    ``z = self.encoder.forward(x)``). With ``patience``, training stops once the mean validation loss has not
    improved for more than ``patience`` validations (the authors' ``wait > patience``) and the weights of the best
    validation are restored before the final checkpoint, which is what the test evaluates.
    """

    name = "protonet"
    # One process: it stops on its validation loss. Way-free: no classifier head, so training episodes may have
    # more ways than the test ones (the authors train 5-shot Omniglot on 60-way episodes).
    capabilities = Capabilities(way_free=True)
    config_keys = frozenset({"lr_decay_every", "patience"})

    def __init__(self, backbone: nn.Module, problem: Problem, config: AlgorithmConfig, max_steps: int) -> None:
        _check_classification("protonet", backbone, problem)
        use_native_norm(backbone)
        super().__init__(backbone, problem, config, max_steps)
        self._val_losses: list[Tensor] = []
        self.best_val_loss = math.inf
        self.best_step: int | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.wait = 0  # validations since the best one
        self.stopped_early = False

    def episode_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int) -> Tensor:
        """Logits ``[m, ways]`` of one episode, support and query embedded as one batch."""
        z = self.backbone.embed(torch.cat([support_x, query_x]))
        n = support_x.shape[0]
        return prototype_logits(z[:n], support_y, z[n:], ways)

    def training_step(self, batch: MetaBatch, batch_idx: int) -> Tensor:
        sx, sy, qx, qy = self._inputs(batch)
        ways = batch.classes.shape[-1]
        outputs = torch.stack([self.episode_logits(s, y, q, ways) for s, y, q in zip(sx, sy, qx)])
        loss = self.problem.loss(outputs.flatten(0, 1), qy.flatten(0, 1))  # equal-sized episodes: the mean of means
        self._check_finite(loss)
        self._log_train(loss, outputs.detach(), qy)
        return loss

    def evaluate_outputs(self, batch: MetaBatch) -> Tensor:
        sx, sy, qx, _ = self._inputs(batch)
        ways = batch.classes.shape[-1]
        with torch.no_grad():
            support, query = episode_features(self.backbone.embed, sx, qx, self.config.bn_mode)
            return torch.stack([prototype_logits(s, y, q, ways) for s, y, q in zip(support, sy, query)])

    def configure_optimizers(self):
        return adam_with_step_decay(self.parameters(), self.config)

    # -- early stopping on the validation loss --

    def validation_step(self, batch: MetaBatch, batch_idx: int) -> None:
        outputs = self.evaluate_outputs(batch)
        self._scores["val"].append(self.problem.episode_scores(outputs, batch.query_y).cpu())
        losses = F.cross_entropy(outputs.transpose(1, 2), batch.query_y, reduction="none").mean(1)
        self._val_losses.append(losses.cpu())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self._val_losses:
            return
        loss = float(torch.cat(self._val_losses).mean())
        self._val_losses = []
        self.log("val/loss", loss)
        if self.config.patience is None or self.trainer.sanity_checking:
            return
        if loss < self.best_val_loss:
            self.best_val_loss, self.best_step, self.wait = loss, int(self.global_step), 0
            self.best_state = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        else:
            self.wait += 1
            if self.wait > self.config.patience:
                self.stopped_early = True
                self.trainer.should_stop = True

    def on_train_end(self) -> None:
        if self.best_state is not None:  # the best validation's weights are the run's result
            self.backbone.load_state_dict(self.best_state)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["metabench_early_stop"] = {"best_val_loss": self.best_val_loss, "best_step": self.best_step,
                                              "wait": self.wait, "stopped": self.stopped_early,
                                              "best_state": self.best_state}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("metabench_early_stop")
        if saved:
            self.best_val_loss, self.best_step = saved["best_val_loss"], saved["best_step"]
            self.wait, self.stopped_early, self.best_state = saved["wait"], saved["stopped"], saved["best_state"]


# -- Baseline and Baseline++ ------------------------------------------------------------------------------------


@LEARNERS.register("baseline")
class Baseline(FineTuning):
    """Baseline of Chen et al. 2019 (and, with ``cosine``, :class:`BaselinePlusPlus`).

    The network is built with a head over the training classes (the runner passes their number, or
    ``algorithm.pretrain.classes``, as its ways). Baseline re-initialises that linear head as the authors'
    ``BaselineTrain`` does (``nn.Linear``'s default weight init, bias 0); Baseline++ replaces it by a
    :class:`CosineClassifier`. Pre-training: :class:`~metabench.models.algorithms.FineTuning` on ordinary
    mini-batches (``datasets.supervised.LabelledBatch``). Evaluation: :meth:`evaluate_outputs`.
    """

    name = "baseline"
    capabilities = Capabilities(supervised_pretraining=True)
    config_keys = frozenset({"lr_decay_every"})
    cosine: ClassVar[bool] = False  # Baseline++'s cosine classifier instead of a linear head

    def __init__(self, backbone: nn.Module, problem: Problem, config: AlgorithmConfig, max_steps: int) -> None:
        _check_classification(config.name, backbone, problem)
        head = getattr(backbone, "head", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{config.name} needs a network whose head is a linear layer, "
                             f"{type(backbone).__name__} has {type(head).__name__}")
        if self.cosine:
            scale = config.cosine_scale or chen_scale(head.out_features)
            backbone.head = CosineClassifier(head.in_features, head.out_features, scale)
        else:
            nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5))
            nn.init.zeros_(head.bias)
        use_native_norm(backbone)
        super().__init__(backbone, problem, config, max_steps)
        self._generator: torch.Generator | None = None

    def supervised_batch(self, batch) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """A ``LabelledBatch`` of the training split: images and their class indices."""
        return self.problem.inputs(batch.images), batch.labels, (1, batch.labels.shape[0])

    def _finetune_generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.config.finetune.seed)
        return self._generator

    def on_validation_epoch_start(self) -> None:  # every evaluation draws the same heads and orders
        self._generator = None

    def on_test_epoch_start(self) -> None:
        self._generator = None

    def evaluate_outputs(self, batch: MetaBatch) -> Tensor:
        """Query logits ``[T, m, ways]``: features of the frozen network (computed once per episode, no gradient),
        a new head per episode fitted to the support features (:func:`finetune_heads`), applied to the queries."""
        sx, sy, qx, _ = self._inputs(batch)
        ways = batch.classes.shape[-1]
        with torch.no_grad():
            support, query = episode_features(self.backbone.embed, sx, qx, self.config.bn_mode)
        scale = (self.config.cosine_scale or chen_scale(ways)) if self.cosine else None
        with torch.enable_grad():  # Lightning evaluates under no_grad; the heads are fitted by gradient steps
            heads = finetune_heads(support, sy, ways, self.config.finetune, self._finetune_generator(),
                                   cosine=self.cosine, scale=scale)
        with torch.no_grad():
            return head_logits(heads, query, scale)


@LEARNERS.register("baseline++")
class BaselinePlusPlus(Baseline):
    """Baseline++ of Chen et al. 2019: :class:`Baseline` with a cosine classifier, in pre-training and on each
    test episode."""

    name = "baseline++"
    cosine = True
