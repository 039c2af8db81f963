"""Hyper-parameters of the algorithms, and the capabilities a learner declares (free of Lightning: the learners'
modules import this one)."""

from __future__ import annotations

from dataclasses import dataclass, field

from metabench.core.roles import CITATION, EXECUTION, TEST, role_field


@dataclass(frozen=True)
class Capabilities:
    """What a learner does, declared on its class (``MetaLearner.capabilities``); the runner, the CLI and the tests
    read these instead of lists of names."""

    second_order: bool = False  # training differentiates through the inner steps (MAML, not FOMAML)
    inner_loop: bool = False  # meta-trains through the functional inner loop: its engines apply, bench speed times it
    # Several processes (DDP) split a meta-batch by tasks and give exactly the one-process gradient: true when
    # nothing couples the tasks (the inner-loop learners normalise each task with its own statistics). Learners
    # that normalise a whole batch at once, or stop on a validation loss, run in one process.
    ddp_exact: bool = False
    # Pre-trained on ordinary mini-batches of the training split labelled with its class indices, not on episodes
    # (datasets/supervised.py): the network's head classifies every training class.
    supervised_pretraining: bool = False
    way_free: bool = False  # no classifier head: training episodes may have more ways than test ones


ANIL_HEAD = "head"  # the parameter-name prefix of every backbone's classifier (Conv4, MLP, ConvSeg)
BN_MODES = ("transductive", "non-transductive")
# how the inner loop maps over tasks (models/inner_loop.py)
INNER_ENGINES = ("vmap", "sequential", "batched", "batched-fused")
BATCHED_ENGINES = ("batched", "batched-fused")  # the engines that run the backbone over an explicit task dim
ENGINES = ("auto", *INNER_ENGINES)  # algorithm.engine: "auto" times INNER_ENGINES' candidates on the first step
INNER_OPTIMIZERS = ("sgd", "adam")
# algorithm.inner_state: "per_task" gives every task a fresh inner-optimizer state; "persistent" (Reptile's code) keeps
# one Adam state that runs on from task to task and across meta-iterations in training, and that each evaluation
# episode starts from without carrying it to the next episode.
INNER_STATES = ("per_task", "persistent")
# MAML++'s five changes, each an AlgorithmConfig switch (off = MAML's behaviour): multi-step loss, learned per-layer
# per-step inner rates, per-step batch norm, derivative-order annealing (epochs of first order), cosine annealing.
MAMLPP_SWITCHES = ("msl", "lslr", "per_step_bn", "first_order_epochs", "cosine_annealing")


@dataclass
class PretrainConfig:
    """baseline / baseline++: the supervised pre-training batches (Chen et al. 2019, Sec. 4.1)."""

    batch_size: int = 16  # images per mini-batch, drawn without replacement from the shuffled training split
    # Outputs of the pre-training classifier; None = the number of training classes. The authors' code sizes it
    # by a flag that only has to exceed the largest label (200 for mini-ImageNet's 64 classes).
    classes: int | None = None
    # Random resized crop, colour jitter (brightness, contrast, saturation 0.4) and horizontal flip, in the
    # authors' order (datasets/supervised.py); False: the images as stored.
    augment: bool = False

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"algorithm.pretrain.batch_size must be positive, got {self.batch_size}")
        if self.classes is not None and self.classes <= 0:
            raise ValueError(f"algorithm.pretrain.classes must be positive or null, got {self.classes}")


@dataclass
class FinetuneConfig:
    """baseline / baseline++: how a new head is fitted to each test episode's frozen support features.

    Defaults: the authors' recipe (github.com/wyharveychen/CloserLookFewShot methods/baselinefinetune.py): SGD with
    momentum 0.9, dampening 0.9, weight decay 0.001, lr 0.01; 100 passes over the shuffled support set in
    mini-batches of 4 (the last one smaller when 4 does not divide it).
    """

    epochs: int = 100
    batch_size: int = 4
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 0.001
    seed: int = 0  # the heads' initialization and the support order; reset at every evaluation

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"algorithm.finetune.{key} must be positive, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"algorithm.finetune.lr must be positive, got {self.lr}")
        for key in ("momentum", "dampening", "weight_decay"):
            if getattr(self, key) < 0:
                raise ValueError(f"algorithm.finetune.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class AlgorithmConfig:
    """Hyper-parameters of one algorithm; ``source`` cites where they come from.

    The fields every built-in learner reads, with checks that hold whatever the learner. What one learner alone
    accepts or requires is checked by its class (``MetaLearner.check_config``); a learner from another package
    adds fields of its own by subclassing this dataclass (``MetaLearner.config_class``).
    """

    name: str = "maml"
    meta_batch: int = 32
    inner_steps: int = 1
    inner_lr: float = 0.4  # metasgd: the initial value of every learned per-parameter rate
    inner_optimizer: str = "sgd"  # "adam" = Adam with beta1 = 0 (Reptile)
    eval_steps: int = role_field(3, TEST)
    # None: same as inner_lr (metasgd: its learned rates, so it must stay None)
    eval_lr: float | None = role_field(None, TEST)
    meta_lr: float = 1e-3  # MAML/FOMAML: Adam learning rate; Reptile: outer step size epsilon
    meta_lr_final: float | None = None  # Reptile: epsilon at the last step (linear annealing); None = 0
    bn_mode: str = role_field("transductive", TEST)  # or "non-transductive" (the Reptile paper's protocol)
    # one of INNER_ENGINES or "auto" (timed on the first step); every engine computes the same (float noise aside)
    engine: str = role_field("auto", EXECUTION)
    # The MAML code adapts on sum(cross-entropy) / K over the N*K support images, i.e. N x the mean loss:
    # its alpha = 0.4 (5-way) is a step of 2.0 on the mean. Presets set this to N to match the paper exactly.
    inner_loss_scale: float = 1.0
    # The adaptation loss sums the per-image losses of its batch instead of averaging them (x inner_loss_scale):
    # TensorFlow's ``minimize`` of a per-example loss vector, as Reptile's code calls it. A fresh Adam state is blind
    # to the loss's scale; a persistent one is not, since its second moment carries the training batches' scale
    # (10 images) into the evaluation steps (5 images).
    inner_loss_sum: bool = False
    # Reptile: each inner step uses a minibatch of this many support images, cycling through the shuffled
    # support set (the paper's "inner batch"); None = every step on the whole support set.
    inner_batch: int | None = None
    # Evaluation: each of the eval_steps adaptation steps uses a minibatch of this many support images, drawn as
    # Reptile's code draws them (supervised_reptile/reptile.py _mini_batches: the support set shuffled anew for every
    # pass, minibatches cut in order and running on across passes; "--eval-batch"); None = the whole support set.
    eval_inner_batch: int | None = role_field(None, TEST)
    # Where the inner optimizer's state lives (INNER_STATES): "persistent" needs inner_optimizer adam and reptile.
    inner_state: str = "per_task"
    # MAML/FOMAML: back-propagate the meta-loss this many tasks at a time (same gradient, peak memory of one
    # chunk instead of the whole meta-batch); None = the whole meta-batch at once. Like the engine, it changes memory,
    # not the result (float noise aside: tests/test_algorithms.py).
    task_chunk: int | None = role_field(None, EXECUTION)
    # Parameter-name prefixes adapted in the inner loop (e.g. ["decoder", "head"]); None = every parameter
    # (anil: ["head"]). The rest are meta-learned (MAML/FOMAML/ANIL) or pre-trained (transfer) but frozen during
    # adaptation.
    adapt: list[str] | None = None
    # Whether the inner loop adapts batch-norm parameters. MAML's reference code does not: its batch-norm
    # offsets are TF variables outside the ``weights`` dict that ``tf.gradients`` adapts, yet trainable, so the
    # outer Adam step meta-learns them (github.com/cbfinn/maml maml.py ``construct_model``). False gives that.
    adapt_norm: bool = True
    # Segmentation: weight of the soft Dice loss added to the per-pixel cross-entropy (0 = cross-entropy only).
    dice_weight: float = 0.0
    # -- MAML++ (Antoniou et al. 2019; name "mamlpp" only, all off by default: then mamlpp is exactly maml) --------
    # MAML++ counts training in epochs of `steps_per_epoch` meta-steps (its code's `total_iter_per_epoch`); the MSL
    # weights, the DA switch and the CA learning rate change at epoch boundaries, as there.
    steps_per_epoch: int = 500
    # MSL: the meta-loss is the weighted sum of the query losses after EVERY inner step, with the code's annealed
    # weights (models.algorithms.msl_weights) for the first `msl_epochs` epochs; after that the last step's only.
    msl: bool = False
    msl_epochs: int = 10
    # LSLR: a learned inner step size per adapted parameter tensor and per inner step (initialised to inner_lr).
    lslr: bool = False
    # BNWB + BNRS: one batch-norm weight and bias per inner step (meta-learned, never adapted: needs adapt_norm
    # false); every step normalises with its own batch's statistics (no running statistics are kept).
    per_step_bn: bool = False
    # DA: the first `first_order_epochs` epochs train first order, the rest second order (0 = second order only).
    first_order_epochs: int = 0
    # CA: meta learning rate cosine-annealed per epoch from meta_lr to meta_lr_min over the run's epochs.
    cosine_annealing: bool = False
    meta_lr_min: float = 0.0
    # protonet, baseline, baseline++ (models/baselines.py). Step decay of the training optimizer's learning rate:
    # multiplied by lr_decay_factor every lr_decay_every training steps (None: constant).
    lr_decay_every: int | None = None
    lr_decay_factor: float = 0.5
    # protonet: stop once the mean validation loss has not improved for this many validations in a row and keep
    # the weights of the best one (None: train for trainer.max_steps and keep the last weights).
    patience: int | None = None
    # baseline++: the fixed factor on the cosine head's logits; None = the authors' rule, per head: 2 for at most
    # 200 classes, else 10 (CloserLookFewShot backbone.py distLinear).
    cosine_scale: float | None = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    source: str = role_field("", CITATION)  # where the values come from: changes nothing computed

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"algorithm.name must be a non-empty string, got {self.name!r}")
        for key, options in (("bn_mode", BN_MODES), ("engine", ENGINES), ("inner_optimizer", INNER_OPTIMIZERS),
                             ("inner_state", INNER_STATES)):
            if getattr(self, key) not in options:
                raise ValueError(f"algorithm.{key} must be one of {', '.join(options)}, got {getattr(self, key)!r}")
        for key in ("meta_batch", "inner_steps", "eval_steps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"algorithm.{key} must be positive, got {getattr(self, key)}")
        for key in ("inner_batch", "eval_inner_batch"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"algorithm.{key} must be positive or null, got {getattr(self, key)}")
        if self.inner_state == "persistent" and self.inner_optimizer != "adam":
            raise ValueError("algorithm.inner_state=persistent needs inner_optimizer adam: SGD keeps no state")
        if self.task_chunk is not None and self.task_chunk <= 0:
            raise ValueError(f"algorithm.task_chunk must be positive or null, got {self.task_chunk}")
        if self.adapt is not None:
            if not self.adapt or not all(isinstance(p, str) and p for p in self.adapt):
                raise ValueError(f"algorithm.adapt must be null or a non-empty list of parameter-name prefixes, "
                                 f"got {self.adapt!r}")
        if self.dice_weight < 0:
            raise ValueError(f"algorithm.dice_weight must be >= 0, got {self.dice_weight}")
        for key in ("inner_lr", "meta_lr", "inner_loss_scale", "lr_decay_factor"):
            if not getattr(self, key) > 0:
                raise ValueError(f"algorithm.{key} must be positive, got {getattr(self, key)}")
        for key in ("lr_decay_every", "patience", "cosine_scale"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ValueError(f"algorithm.{key} must be positive or null, got {getattr(self, key)}")
        for key in ("steps_per_epoch", "msl_epochs"):
            if getattr(self, key) <= 0:
                raise ValueError(f"algorithm.{key} must be positive, got {getattr(self, key)}")
        if self.first_order_epochs < 0:
            raise ValueError(f"algorithm.first_order_epochs must be >= 0, got {self.first_order_epochs}")
        if not 0 <= self.meta_lr_min <= self.meta_lr:
            raise ValueError(f"algorithm.meta_lr_min must be in [0, meta_lr], got {self.meta_lr_min}")
