"""BOIL (Oh, Yoo, Kim, Yun, "BOIL: Towards Representation Change for Few-shot Learning", ICLR 2021,
arXiv:2008.08882): MAML whose inner loop adapts the body and leaves the head alone.

BOIL "updates only the body (extractor) of the model and freezes the head (classifier) during inner loop updates"
(abstract): each task's adaptation changes the features, not the classifier, while the outer loop meta-trains every
parameter, second order, as MAML does. Everything else is MAML's, so this class reuses metabench's MAML step and
only changes which parameters the inner loop adapts.
"""

from __future__ import annotations

from dataclasses import dataclass

from metabench.models.algorithms import MAML
from metabench.models.hparams import AlgorithmConfig


@dataclass
class BOILConfig(AlgorithmConfig):
    """MAML's hyper-parameters plus the one BOIL adds: which parameters make the head (frozen in the inner loop)."""

    head: str = "head"  # parameter-name prefix of the classifier; metabench's backbones all call it "head"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.head:
            raise ValueError("algorithm.head must name the classifier's parameter prefix (e.g. head)")


class BOIL(MAML):
    """MAML with the head frozen in the inner loop (BOIL); second order, one process or several (DDP) alike."""

    name = "boil"
    config_class = BOILConfig
    preset_base = "maml"  # a benchmark preset without a boil section runs it with its MAML hyper-parameters

    @classmethod
    def check_config(cls, config: AlgorithmConfig) -> AlgorithmConfig:
        config = super().check_config(config)
        if config.adapt is not None:
            raise ValueError("algorithm.adapt is set by boil itself (every parameter but algorithm.head's); "
                             "leave it null")
        return config

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        head = self.config.head
        frozen = {n for n in self.adapted_names if n == head or n.startswith(head + ".")}
        if not frozen:
            raise ValueError(f"boil: no parameter of {type(self.backbone).__name__} is named {head!r}.*")
        self.adapted_names = self.adapted_names - frozen  # params() is what the inner loop adapts
