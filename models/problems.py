"""Problems: what an episode's inputs mean, which loss adapts the model and which score an episode gets.

The algorithms only talk to a problem, so the same MAML / FOMAML / Reptile modules serve classification
and segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metabench.datasets.base import MASK_IGNORE


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




@dataclass(frozen=True)
class Segmentation:
    """Few-shot semantic segmentation: per-pixel cross-entropy (+ optional Dice), per-episode foreground IoU.

    Targets are int64 masks ``[..., H, W]``: 0 background, ``l + 1`` on the foreground of episode label ``l``,
    :data:`MASK_IGNORE` where nothing is scored; outputs are logits ``[..., ways + 1, H, W]``.

    Everything is written with plain tensor ops (no ``ignore_index`` kernels), so the loss is exact under
    ``torch.func.vmap`` and differentiable twice (second-order MAML).

    Args:
        dice_weight: weight of the soft Dice loss over the foreground channels added to the cross-entropy
            (0: cross-entropy only).
    """

    dice_weight: float = 0.0
    metric_name = "fg_iou"

    @staticmethod
    def inputs(x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float in [0, 1] (float inputs pass through)."""
        return x.float() / 255.0 if x.dtype == torch.uint8 else x

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the non-ignored pixels (+ ``dice_weight`` x soft Dice loss).

        ``outputs`` ``[B, C, H, W]``, ``targets`` ``[B, H, W]``. With no valid pixel at all the loss is 0.
        """
        valid = targets != MASK_IGNORE
        safe = torch.where(valid, targets, torch.zeros_like(targets))  # any in-range label; masked out below
        log_probs = outputs.log_softmax(dim=1)
        picked = log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
        weight = valid.to(outputs.dtype)
        ce = -(picked * weight).sum() / weight.sum().clamp_min(1.0)
        if not self.dice_weight:
            return ce
        return ce + self.dice_weight * dice_loss(log_probs.exp(), safe, weight)

    @staticmethod
    def episode_scores(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Foreground IoU of each episode: ``outputs`` ``[T, m, ways + 1, H, W]``, ``targets`` ``[T, m, H, W]``
        -> ``[T]``. Intersections and unions are summed over the episode's queries, per foreground label, then
        IoU per label (:func:`iou`; an empty union scores 1) and the mean over the episode's labels."""
        counts = episode_counts(outputs, targets)
        return iou(counts[:, 1:, 0], counts[:, 1:, 1]).mean(-1)

    @staticmethod
    def episode_stats(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Intersection and union of every label of every episode, ``[T, ways + 1, 2]`` (for mIoU / FB-IoU)."""
        return episode_counts(outputs, targets)

    @staticmethod
    def summary_metrics(stats: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
        """``{"miou", "fb_iou"}`` of a test set from its episodes' counts (see :func:`mean_iou`, :func:`fb_iou`)."""
        return {"miou": mean_iou(stats, classes), "fb_iou": fb_iou(stats)}


def dice_loss(probs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - mean_c (2 |p_c t_c| + s) / (|p_c| + |t_c| + s)`` over foreground channels c >= 1,
    pixels weighted by ``weight`` (0 on ignored pixels). ``probs`` ``[B, C, H, W]``, ``targets`` ``[B, H, W]``."""
    channels = probs.shape[1]
    onehot = (targets.unsqueeze(1) == torch.arange(channels, device=targets.device).view(1, -1, 1, 1))
    w = weight.unsqueeze(1)
    p, t = probs[:, 1:] * w, onehot[:, 1:].to(probs.dtype) * w
    dims = (0, 2, 3)
    dice = (2.0 * (p * t).sum(dims) + smooth) / (p.sum(dims) + t.sum(dims) + smooth)
    return 1.0 - dice.mean()


def episode_counts(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per episode and label, the pixel intersection and union of prediction and truth over all its queries.

    ``outputs`` ``[T, m, C, H, W]`` logits (prediction = argmax over C), ``targets`` ``[T, m, H, W]``.
    Returns float64 ``[T, C, 2]``: ``[..., 0]`` intersection, ``[..., 1]`` union; label 0 is background.
    Pixels labelled :data:`MASK_IGNORE` count in neither (whatever is predicted there).
    """
    channels = outputs.shape[2]
    pred = outputs.argmax(dim=2)
    valid = targets != MASK_IGNORE
    labels = torch.arange(channels, device=targets.device).view(1, -1, 1, 1, 1)
    p = (pred.unsqueeze(1) == labels) & valid.unsqueeze(1)  # [T, C, m, H, W]
    t = targets.unsqueeze(1) == labels  # ignored pixels (255) match no label
    inter = (p & t).flatten(2).sum(-1)
    union = (p | t).flatten(2).sum(-1)
    return torch.stack([inter, union], dim=-1).double()


def iou(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """``intersection / union``, and 1.0 where the union is empty.

    An empty union means the label is absent from both truth and prediction: the prediction is exactly right,
    so it scores 1 (as in FSS-style evaluation, where an empty prediction of an absent object is correct)
    rather than being dropped, which would make the per-episode score undefined.
    """
    empty = union == 0
    return torch.where(empty, torch.ones_like(union), intersection / torch.where(empty, torch.ones_like(union), union))


def mean_iou(stats: torch.Tensor, classes: torch.Tensor) -> float:
    """mIoU as in PASCAL-5i / FSS-1000 papers (Shaban et al. 2017; Wang et al. 2019, PANet):
    for each split class, intersections and unions summed over every episode (and episode label) showing that
    class, IoU per class, then the mean over the classes that occur.

    ``stats`` ``[E, ways + 1, 2]`` from :func:`episode_counts`; ``classes`` ``[E, ways]`` split class indices.
    """
    classes = classes.reshape(-1).long().cpu()
    fg = stats[:, 1:].reshape(-1, 2).cpu()
    present = torch.unique(classes)
    sums = torch.zeros(int(classes.max()) + 1, 2, dtype=torch.float64).index_add_(0, classes, fg)[present]
    return float(iou(sums[:, 0], sums[:, 1]).mean())


def fb_iou(stats: torch.Tensor) -> float:
    """FB-IoU: the mean of the foreground IoU and the background IoU, each pooled over all episodes.

    Foreground pools every episode label (for 1-way, label 1); background is label 0.
    """
    fg = stats[:, 1:].sum(dim=(0, 1))
    bg = stats[:, 0].sum(dim=0)
    return float((iou(fg[0], fg[1]) + iou(bg[0], bg[1])) / 2)
