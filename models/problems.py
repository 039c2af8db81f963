"""Problems: what an episode's inputs mean, which loss adapts the model and which score an episode gets.

The algorithms only talk to a problem, so the same MAML / FOMAML / Reptile modules serve classification
and (later) segmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Classification:
    """N-way classification: cross-entropy loss, per-episode accuracy.

    Args:
        invert: map uint8 ``x`` to ``1 - x / 255`` instead of ``x / 255`` (bright strokes on black, as the
            MAML code feeds Omniglot; zero background keeps the early activations sparse).
    """

    invert: bool = False

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float in [0, 1] (float inputs pass through, so float64 tests can feed data)."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
            return 1.0 - x if self.invert else x
        return x

    @staticmethod
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    @staticmethod
    def episode_scores(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Accuracy of each episode: ``outputs`` ``[T, m, ways]``, ``targets`` ``[T, m]`` -> ``[T]``."""
        return (outputs.argmax(-1) == targets).float().mean(-1)

    metric_name = "accuracy"


def mean_ci95(scores: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width ``1.96 * s / sqrt(n)``, ``s`` the sample standard deviation (n - 1).

    The normal approximation is what few-shot papers report; with 600 episodes it is within 0.3% of the
    t-interval. One score has no spread: its CI is NaN.
    """
    n = len(scores)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one score")
    mean = math.fsum(scores) / n
    if n < 2:
        return mean, float("nan")
    var = math.fsum((s - mean) ** 2 for s in scores) / (n - 1)
    return mean, 1.96 * math.sqrt(var) / math.sqrt(n)
