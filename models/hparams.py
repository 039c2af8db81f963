"""Hyper-parameters of the algorithms (kept free of Lightning so configs resolve without importing it)."""

from __future__ import annotations

from dataclasses import dataclass

ALGORITHMS = ("maml", "fomaml", "reptile")
BN_MODES = ("transductive", "non-transductive")
ENGINES = ("auto", "vmap", "sequential")
INNER_OPTIMIZERS = ("sgd", "adam")


@dataclass
class AlgorithmConfig:
    """Hyper-parameters of one algorithm; ``source`` cites where they come from."""

    name: str = "maml"
    meta_batch: int = 32
    inner_steps: int = 1
    inner_lr: float = 0.4
    inner_optimizer: str = "sgd"  # "adam" = Adam with beta1 = 0 (Reptile)
    eval_steps: int = 3
    eval_lr: float | None = None  # None: same as inner_lr
    meta_lr: float = 1e-3  # MAML/FOMAML: Adam learning rate; Reptile: outer step size epsilon
    meta_lr_final: float | None = None  # Reptile: epsilon at the last step (linear annealing); None = 0
    bn_mode: str = "transductive"  # or "non-transductive" (the Reptile paper's protocol)
    engine: str = "auto"  # "vmap", "sequential" or "auto" (chosen per device)
    # The MAML code adapts on sum(cross-entropy) / K over the N*K support images, i.e. N x the mean loss:
    # its alpha = 0.4 (5-way) is a step of 2.0 on the mean. Presets set this to N to match the paper exactly.
    inner_loss_scale: float = 1.0
    # Reptile: each inner step uses a minibatch of this many support images, cycling through the shuffled
    # support set (the paper's "inner batch"); None = every step on the whole support set.
    inner_batch: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.name!r}; known: {', '.join(ALGORITHMS)}")
        for key, options in (("bn_mode", BN_MODES), ("engine", ENGINES), ("inner_optimizer", INNER_OPTIMIZERS)):
            if getattr(self, key) not in options:
                raise ValueError(f"algorithm.{key} must be one of {', '.join(options)}, got {getattr(self, key)!r}")
        for key in ("meta_batch", "inner_steps", "eval_steps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"algorithm.{key} must be positive, got {getattr(self, key)}")
        if self.inner_batch is not None and self.inner_batch <= 0:
            raise ValueError(f"algorithm.inner_batch must be positive, got {self.inner_batch}")
        for key in ("inner_lr", "meta_lr", "inner_loss_scale"):
            if not getattr(self, key) > 0:
                raise ValueError(f"algorithm.{key} must be positive, got {getattr(self, key)}")

    @property
    def first_order(self) -> bool:
        """Whether training drops the second-order terms (FOMAML; Reptile needs no meta-gradient at all)."""
        return self.name != "maml"
