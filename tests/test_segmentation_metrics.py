"""Segmentation loss and metrics against hand-computed masks: per-episode foreground IoU, mIoU, FB-IoU,
empty predictions, empty unions and ignore labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from metabench.datasets.base import MASK_IGNORE
from metabench.models.problems import Segmentation, episode_counts, fb_iou, iou, mean_iou

X = MASK_IGNORE


def logits_for(pred: torch.Tensor, channels: int) -> torch.Tensor:
    """Logits whose argmax over the channel dim (dim -3) is ``pred`` ``[..., H, W]``."""
    return F.one_hot(pred, channels).movedim(-1, -3).double() * 5.0


def test_counts_and_fg_iou_of_a_hand_made_episode() -> None:
    # One 1-way episode, two 2x3 queries.
    truth = torch.tensor([[[1, 1, 0], [0, 0, 0]],
                          [[0, 1, 1], [X, 1, 0]]])
    pred = torch.tensor([[[1, 0, 0], [1, 0, 0]],
                         [[0, 1, 0], [1, 1, 1]]])  # the ignored pixel is predicted fg: it must not count
    outputs = logits_for(pred, 2)[None]
    counts = episode_counts(outputs, truth[None])
    # fg: query 0: I=1 (pixel 0,0), U=3 (0,0; 0,1; 1,0); query 1: I=2 ((0,1), (1,1)), U=4 ((0,1),(0,2),(1,1),(1,2))
    # bg: query 0: I=3, U=5; query 1: I=1 ((0,0)), U=3 ((0,0),(0,2),(1,2))
    assert counts.tolist() == [[[4.0, 8.0], [3.0, 7.0]]]
    score = Segmentation.episode_scores(outputs, truth[None])
    assert score.tolist() == pytest.approx([3 / 7])  # summed over the episode's queries, not averaged per query


def test_empty_prediction_scores_zero_and_empty_union_scores_one() -> None:
    truth = torch.tensor([[[[0, 1], [1, 0]]], [[[0, 0], [0, X]]]])  # episode 0 has fg, episode 1 has none
    empty = logits_for(torch.zeros(2, 1, 2, 2, dtype=torch.long), 2)
    scores = Segmentation.episode_scores(empty, truth)
    assert scores.tolist() == [0.0, 1.0]  # missed everything; nothing to find and nothing predicted
    wrong = logits_for(torch.tensor([[[[0, 0], [0, 0]]], [[[0, 1], [0, 0]]]]), 2)
    assert Segmentation.episode_scores(wrong, truth).tolist() == [0.0, 0.0]  # a false positive on an empty truth


def test_ignored_pixels_count_nowhere() -> None:
    truth = torch.full((1, 1, 2, 2), X)
    truth[0, 0, 0, 0] = 1
    for pred in (torch.ones(1, 1, 2, 2, dtype=torch.long), torch.tensor([[[[1, 0], [0, 0]]]])):
        counts = episode_counts(logits_for(pred, 2), truth)
        assert counts[0, 1].tolist() == [1.0, 1.0]  # only the one valid pixel
        assert counts[0, 0].tolist() == [0.0, 0.0]


def test_two_way_episode_score_is_the_mean_over_labels() -> None:
    truth = torch.tensor([[[[1, 1, 0, 0]], [[2, 2, 2, 0]]]])  # query 0 shows label 0 (1), query 1 label 1 (2)
    pred = torch.tensor([[[[1, 0, 0, 0]], [[2, 2, 1, 0]]]])
    scores = Segmentation.episode_scores(logits_for(pred, 3), truth)
    # label 1: I=1, U=3 (pixels q0:0,1 and q1:2); label 2: I=2, U=3
    assert scores.tolist() == pytest.approx([(1 / 3 + 2 / 3) / 2])


def test_miou_sums_per_class_then_averages_classes() -> None:
    # counts [E, 2, 2] (bg, fg) x (I, U) for three 1-way episodes; classes 7, 3, 7.
    stats = torch.tensor([[[10., 12.], [1., 4.]],
                          [[20., 21.], [6., 8.]],
                          [[5., 9.], [3., 4.]]], dtype=torch.float64)
    classes = torch.tensor([[7], [3], [7]])
    # class 7: (1 + 3) / (4 + 4) = 0.5; class 3: 6 / 8 = 0.75 -> mIoU 0.625 (the episode mean would be 0.667)
    assert mean_iou(stats, classes) == pytest.approx(0.625)
    # FB-IoU: fg pooled (1+6+3)/(4+8+4) = 10/16, bg pooled 35/42
    assert fb_iou(stats) == pytest.approx((10 / 16 + 35 / 42) / 2)
    expected = {"miou": 0.625, "fb_iou": (10 / 16 + 35 / 42) / 2}
    assert Segmentation.summary_metrics(stats, classes) == pytest.approx(expected)


def test_miou_of_two_way_episodes_uses_each_label_class() -> None:
    stats = torch.tensor([[[0., 1.], [1., 2.], [3., 4.]]], dtype=torch.float64)  # bg, label 0, label 1
    assert mean_iou(stats, torch.tensor([[4, 9]])) == pytest.approx((0.5 + 0.75) / 2)
    assert mean_iou(stats, torch.tensor([[4, 4]])) == pytest.approx(4 / 6)  # same class twice: pooled


def test_iou_of_empty_union_is_one() -> None:
    assert iou(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 4.0])).tolist() == [1.0, 0.5]


def test_loss_matches_cross_entropy_with_ignore_index() -> None:
    torch.manual_seed(0)
    outputs = torch.randn(3, 3, 5, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (3, 5, 4))
    targets[0, :2] = X
    expected = F.cross_entropy(outputs, targets, ignore_index=X)
    torch.testing.assert_close(Segmentation().loss(outputs, targets), expected)
    assert Segmentation().loss(outputs, torch.full_like(targets, X)).item() == 0.0  # nothing to learn from


def test_dice_term_by_hand() -> None:
    # One image, two pixels, logits that give p(fg) = 0.5 and 0.8; truth fg on pixel 0 only; pixel 2 ignored.
    p = torch.tensor([0.5, 0.8, 0.3], dtype=torch.float64)
    outputs = torch.stack([torch.zeros(3, dtype=torch.float64), torch.log(p / (1 - p))]).view(1, 2, 1, 3)
    targets = torch.tensor([[[1, 0, X]]])
    ce = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.2))).item() / 2
    dice = 1 - (2 * 0.5 + 1) / ((0.5 + 0.8) + 1 + 1)
    assert Segmentation(dice_weight=0.5).loss(outputs, targets).item() == pytest.approx(ce + 0.5 * dice)


def test_loss_is_exact_under_vmap_including_second_order() -> None:
    torch.manual_seed(1)
    outputs = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 2, (2, 3, 4, 4))
    targets[1, 0, 0] = X
    problem = Segmentation(dice_weight=1.0)
    batched = vmap(problem.loss)(outputs, targets)
    looped = torch.stack([problem.loss(o, t) for o, t in zip(outputs, targets)])
    torch.testing.assert_close(batched, looped)
    (g,) = torch.autograd.grad(batched.sum(), outputs, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), outputs)
    (g2,) = torch.autograd.grad(looped.sum(), outputs, create_graph=True)
    (gg2,) = torch.autograd.grad(g2.square().sum(), outputs)
    torch.testing.assert_close(gg, gg2)
