"""Metric functions against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.metrics import (
    PixelStats,
    confusion_matrices,
    kaggle_metric,
    label_accuracy,
    mask_stats,
    pair_dice,
    per_class_accuracy,
    score,
    thesis_dice,
)


def test_pair_dice_hand_computed_cases() -> None:
    # (intersection, predicted, truth): empty/empty, empty prediction, false positive, partial overlap, exact
    inter = np.array([0, 0, 0, 2, 6])
    pred = np.array([0, 0, 4, 4, 6])
    truth = np.array([0, 5, 0, 6, 6])
    assert pair_dice(inter, pred, truth).tolist() == [1.0, 0.0, 0.0, pytest.approx(0.4), 1.0]


def _masks() -> tuple[np.ndarray, np.ndarray]:
    """One 4x5 image, three classes: both empty / false positive (4 px) / partial overlap."""
    pred = np.zeros((1, 3, 4, 5), dtype=np.uint8)
    truth = np.zeros_like(pred)
    pred[0, 1, 0, 0:4] = 1  # class 2: 4 predicted pixels, no truth
    pred[0, 2, 1, 0:4] = 1  # class 3: 4 predicted pixels ...
    truth[0, 2, 1, 2:5] = 1  # ... 6 true pixels, 2 of them shared (columns 2 and 3 of row 1)
    truth[0, 2, 2, 2:5] = 1
    return pred, truth


def test_mask_stats_and_kaggle_metric_with_and_without_min_area() -> None:
    pred, truth = _masks()
    stats = mask_stats(pred, truth)
    assert stats.intersection.tolist() == [[0, 0, 2]]
    assert stats.predicted.tolist() == [[0, 4, 4]]
    assert stats.truth.tolist() == [[0, 0, 6]]
    assert stats.present.tolist() == [[False, True, True]]
    assert kaggle_metric(stats) == pytest.approx((1.0 + 0.0 + 0.4) / 3)
    assert kaggle_metric(stats, per_class=True).tolist() == [1.0, 0.0, pytest.approx(0.4)]

    # min area 5: the 4-pixel false positive and the 4-pixel partial hit are both absent -> empty masks
    gated = mask_stats(pred, truth, min_areas=[5, 5, 5])
    assert gated.present.tolist() == [[False, False, False]]
    assert kaggle_metric(gated, per_class=True).tolist() == [1.0, 1.0, 0.0]


def test_mask_stats_accepts_torch_and_the_models_present_output() -> None:
    pred, truth = _masks()
    present = torch.tensor([[False, False, True]])
    stats = mask_stats(torch.from_numpy(pred), torch.from_numpy(truth), present=present)
    assert stats.present.tolist() == [[False, False, True]]
    assert kaggle_metric(stats) == pytest.approx((1.0 + 1.0 + 0.4) / 3)


def test_thesis_dice_is_pooled_with_smoothing_one() -> None:
    pred, truth = _masks()
    stats = mask_stats(pred, truth)
    # pooled: intersection 2, predicted 8, truth 6 -> (2*2 + 1) / (8 + 6 + 1)
    assert thesis_dice(stats) == pytest.approx(5 / 15)
    assert thesis_dice(stats, per_class=True).tolist() == [1.0, pytest.approx(1 / 5), pytest.approx(5 / 11)]


def test_label_metrics_and_confusion_hand_computed() -> None:
    present = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=bool)
    truth = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    assert label_accuracy(present, truth) == pytest.approx(2 / 4)
    assert per_class_accuracy(present, truth).tolist() == [1.0, pytest.approx(2 / 4)]
    # class 1: TN 2, FP 0, FN 0, TP 2; class 2: TN 1 (row 1), FP 1 (row 2), FN 1 (row 3), TP 1 (row 4)
    assert confusion_matrices(present, truth).tolist() == [[2, 0, 0, 2], [1, 1, 1, 1]]


def test_score_collects_everything() -> None:
    stats = PixelStats(
        intersection=[[0, 3]], predicted=[[0, 3]], truth=[[0, 3]], present=[[False, True]]
    )
    result = score(stats).to_dict()
    assert result["kaggle"] == 1.0
    assert result["label_accuracy"] == 1.0
    assert result["confusion"]["per_class"] == [[1, 0, 0, 0], [0, 0, 0, 1]]


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="same shape"):
        mask_stats(np.zeros((1, 2, 4, 4)), np.zeros((1, 3, 4, 4)))
    with pytest.raises(ValueError, match="intersection exceeds"):
        PixelStats(intersection=[[5]], predicted=[[4]], truth=[[9]], present=[[True]])
    with pytest.raises(ValueError, match="empty set of images"):
        label_accuracy(np.zeros((0, 4), bool), np.zeros((0, 4), bool))
