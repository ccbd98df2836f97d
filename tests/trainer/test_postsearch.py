"""The vectorised post-processing search: exact counts, and a constructed case it must improve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from network.processing import postprocess
from trainer.metrics import kaggle_metric, mask_stats
from trainer.postsearch import DEFAULT_THRESHOLDS, default_min_area_grid, search, threshold_stats


def test_threshold_stats_equal_direct_counts() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((3, 2, 16, 24), dtype=np.float32)
    probs[0, 0, 0, :4] = 0.5  # exactly on a threshold: p >= t counts it, as the inspection graph does
    truth = rng.random((3, 2, 16, 24)) < 0.3
    stats = threshold_stats(torch.from_numpy(probs), torch.from_numpy(truth))
    for j, t in enumerate(stats.thresholds):
        hits = probs >= t
        assert (stats.predicted[..., j] == hits.sum(axis=(2, 3))).all()
        assert (stats.intersection[..., j] == (hits & truth).sum(axis=(2, 3))).all()
    assert (stats.truth == truth.sum(axis=(2, 3))).all()


def _constructed_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1: real defects the model is unsure of (p = 0.4, missed at 0.5).
    Class 2: never a defect, but 60-pixel specks of p = 0.9 in every other image (kept at min area 20)."""
    n, h, w = 8, 32, 64
    probs = torch.full((n, 2, h, w), 0.05)
    truth = torch.zeros((n, 2, h, w), dtype=torch.uint8)
    for i in range(0, n, 2):
        truth[i, 0, 8:20, 10:35] = 1  # 300 px defect
        probs[i, 0, 8:20, 10:35] = 0.4
        probs[i, 0, 20:22, 10:35] = 0.3  # a fringe at lower confidence, outside the truth
        probs[i + 1, 1, 0:6, 0:10] = 0.9  # 60 px false positive
    return probs, truth


def test_search_improves_the_kaggle_metric_on_a_constructed_case() -> None:
    probs, truth = _constructed_case()
    stats = threshold_stats(probs, truth)
    result = search(stats, min_area_grid=[1, 20, 50, 100, 200], baseline_thresholds=[0.5, 0.5],
                    baseline_min_areas=[20, 20])
    # baseline: class 1 misses all 4 defects (4 of 8 pairs score 0), class 2 has 4 false positives
    assert result.baseline_kaggle == pytest.approx(0.5)
    assert result.kaggle == pytest.approx(1.0)
    assert 0.3 < result.thresholds[0] <= 0.4  # above the fringe, at or below the defect's confidence
    assert result.min_areas[1] == 100  # the first grid area above the 60 px specks
    assert result.to_dict()["kaggle_after"] > result.to_dict()["kaggle_before"]

    # The chosen settings reproduce the searched score through the inspection graph's own post-processing.
    masks, counts, present = postprocess(probs, torch.tensor(result.thresholds), torch.tensor(result.min_areas))
    assert kaggle_metric(mask_stats(masks, truth, present=present)) == pytest.approx(result.kaggle)


def test_search_rejects_a_baseline_threshold_outside_the_grid() -> None:
    probs, truth = _constructed_case()
    stats = threshold_stats(probs, truth, thresholds=DEFAULT_THRESHOLDS)
    with pytest.raises(ValueError, match="not in the searched grid"):
        search(stats, [1, 100], baseline_thresholds=[0.42, 0.5], baseline_min_areas=[1, 1])


def test_default_min_area_grid_scales_with_frame_area() -> None:
    full = default_min_area_grid(256, 1600)
    assert 200 in full and full[0] == 1
    quarter = default_min_area_grid(128, 800)
    assert 50 in quarter and max(quarter) == 5000
