"""Per-class threshold and minimum-area search on out-of-fold probabilities.

The search never re-runs a model. While the evaluation streams the probabilities past once,
:func:`threshold_stats` records, for every (image, class) and every candidate threshold, how
many pixels reach the threshold and how many of those are true defect pixels. The Kaggle metric
of any (threshold, minimum area) pair then follows from those counts alone: a class is present
when its count reaches the minimum area, and an absent class contributes an empty mask. The
whole grid is scored in one broadcast ``[images, classes, thresholds, min_areas]`` (chunked over
images), and each class picks its own best pair, since a class's choice only moves its own
pairs' Dice.

The comparisons are the ones :func:`network.processing.postprocess` makes (float32 ``p >= t``, an
exact integer count ``>= min_area``), so the chosen values reproduce the searched score exactly
when they travel into the exported graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer.metrics import PixelStats, kaggle_metric, pair_dice

log = logging.getLogger(__name__)

#: Candidate probability thresholds: 0.10, 0.15, ..., 0.95 (contains the thesis' 0.5).
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 + 0.05 * i, 2) for i in range(18))

#: Candidate minimum areas for a full-size Severstal frame (256 x 1600 = 409,600 pixels); the thesis
#: used 200, the winning Kaggle solution 600-2,000; large defects (cracks, stains) allow far more. Scaled to other frame sizes by area.
REFERENCE_FRAME_PIXELS = 256 * 1600
REFERENCE_MIN_AREAS: tuple[int, ...] = (
    1, 50, 100, 200, 300, 400, 600, 800, 1000, 1200, 1500, 2000, 2500, 3000, 4000, 5000, 7500, 10000, 15000,
    20000,
)


def default_min_area_grid(height: int, width: int) -> list[int]:
    """The reference minimum-area grid scaled to ``height x width`` frames (deduplicated, >= 1).

    The grid starts at 1, never 0: a minimum area of 0 would call every class present, and it
    never scores higher than 1 on the Kaggle metric (an empty mask is empty either way).
    """
    scale = height * width / REFERENCE_FRAME_PIXELS
    return sorted({max(1, int(round(a * scale))) for a in REFERENCE_MIN_AREAS})


@dataclass
class ThresholdStats:
    """Per-(image, class, threshold) counts of a set of probability maps.

    Attributes:
        thresholds: ascending float32 candidate thresholds ``[T]``.
        predicted: int64 ``[N, C, T]`` pixels with ``p >= thresholds[t]``.
        intersection: int64 ``[N, C, T]`` of those, pixels that are true defect pixels.
        truth: int64 ``[N, C]`` true defect pixels.
        gate: float32 ``[N, C]`` class probabilities of a gate head, or None.
    """

    thresholds: np.ndarray
    predicted: np.ndarray
    intersection: np.ndarray
    truth: np.ndarray
    gate: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.truth.shape[0])

    @classmethod
    def concatenate(cls, parts: Sequence[ThresholdStats]) -> ThresholdStats:
        if not parts:
            raise ValueError("no threshold statistics to concatenate")
        for p in parts[1:]:
            if not np.array_equal(p.thresholds, parts[0].thresholds):
                raise ValueError("cannot concatenate threshold statistics over different threshold grids")
        return cls(
            thresholds=parts[0].thresholds,
            predicted=np.concatenate([p.predicted for p in parts]),
            intersection=np.concatenate([p.intersection for p in parts]),
            truth=np.concatenate([p.truth for p in parts]),
            gate=None if any(p.gate is None for p in parts) else np.concatenate([p.gate for p in parts]),
        )

    def threshold_index(self, threshold: float) -> int:
        hits = np.flatnonzero(self.thresholds == np.float32(threshold))
        if hits.size == 0:
            raise ValueError(
                f"threshold {threshold} is not in the searched grid {[float(t) for t in self.thresholds]}"
            )
        return int(hits[0])

    def pixel_stats(self, thresholds: Sequence[float], min_areas: Sequence[int],
                    gate_thresholds: Sequence[float] | None = None) -> PixelStats:
        """The pixel statistics :func:`network.processing.postprocess` (and the gate, when given) would give."""
        c = self.truth.shape[1]
        if len(thresholds) != c or len(min_areas) != c:
            raise ValueError(f"expected {c} thresholds and {c} min areas, got {len(thresholds)} and {len(min_areas)}")
        index = np.array([self.threshold_index(t) for t in thresholds])
        classes = np.arange(c)
        predicted = self.predicted[:, classes, index]
        intersection = self.intersection[:, classes, index]
        present = predicted >= np.asarray(min_areas, dtype=np.int64).reshape(1, c)
        if gate_thresholds is not None:
            if self.gate is None:
                raise ValueError("gate thresholds given, but these statistics hold no gate probabilities")
            present &= self.gate >= np.asarray(gate_thresholds, dtype=np.float32).reshape(1, c)
        return PixelStats(intersection, predicted, self.truth, present)


def threshold_stats(probs: Any, truth_masks: Any, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> ThresholdStats:
    """Counts for every candidate threshold in one pass over ``probs`` ``[N, C, H, W]``.

    Each pixel's probability is bucketed among the sorted thresholds (``torch.bucketize``); one
    ``bincount`` per (image, class, bucket) and a reversed cumulative sum then give the pixels at
    or above every threshold, the same float32 comparison the inspection graph makes.
    """
    probs_t = probs if isinstance(probs, torch.Tensor) else torch.from_numpy(np.asarray(probs))
    truth_t = truth_masks if isinstance(truth_masks, torch.Tensor) else torch.from_numpy(np.asarray(truth_masks))
    probs_t = probs_t.detach().to(torch.float32)
    truth_t = truth_t.detach().to(probs_t.device) != 0
    if probs_t.dim() != 4 or tuple(probs_t.shape) != tuple(truth_t.shape):
        raise ValueError(
            f"probabilities and true masks must both be [N, C, H, W] of the same shape, got "
            f"{list(probs_t.shape)} and {list(truth_t.shape)}"
        )
    grid = np.asarray(sorted(set(np.float32(t) for t in thresholds)), dtype=np.float32)
    if grid.size == 0 or grid[0] <= 0 or grid[-1] >= 1:
        raise ValueError(f"thresholds must be a non-empty set of values strictly between 0 and 1, got {list(thresholds)}")
    n, c = probs_t.shape[:2]
    t = grid.size
    boundaries = torch.from_numpy(grid).to(probs_t.device)
    # bucket b holds grid[b-1] <= p < grid[b]: a pixel reaches threshold j exactly when b > j.
    bucket = torch.bucketize(probs_t, boundaries, right=True)
    pair = torch.arange(n * c, device=probs_t.device).view(n, c, 1, 1) * (t + 1)
    key = (bucket + pair).flatten()
    bins = n * c * (t + 1)
    histogram = torch.bincount(key, minlength=bins).view(n, c, t + 1)
    true_histogram = torch.bincount(key[truth_t.flatten()], minlength=bins).view(n, c, t + 1)

    def at_or_above(h: torch.Tensor) -> np.ndarray:
        tail = h.flip(-1).cumsum(-1).flip(-1)  # tail[..., b] = pixels in buckets >= b
        return tail[..., 1:].cpu().numpy().astype(np.int64)

    return ThresholdStats(
        thresholds=grid,
        predicted=at_or_above(histogram),
        intersection=at_or_above(true_histogram),
        truth=truth_t.sum(dim=(2, 3)).cpu().numpy().astype(np.int64),
    )


#: Candidate gate thresholds (class probability of the gate head); 0 = the gate never vetoes.
DEFAULT_GATE_THRESHOLDS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def search_gate(stats: ThresholdStats, thresholds: Sequence[float], min_areas: Sequence[int],
                grid: Sequence[float] = DEFAULT_GATE_THRESHOLDS) -> tuple[list[float], list[float]]:
    """Per class, the gate threshold maximising the Kaggle metric given the chosen pixel threshold and
    minimum area (lowest on ties; 0 is in the grid, so it never scores below no gate).

    Returns:
        the gate thresholds, and the per-class Kaggle metric with them.
    """
    if stats.gate is None:
        raise ValueError("no gate probabilities: the folds have no gate head (trainer fit --gate)")
    c = stats.truth.shape[1]
    grid = sorted({float(g) for g in grid} | {0.0})
    base = stats.pixel_stats(thresholds, min_areas)
    scores = np.zeros((c, len(grid)))
    for j, g in enumerate(grid):
        present = base.present & (stats.gate >= np.float32(g))
        scores[:, j] = kaggle_metric(PixelStats(base.intersection, base.predicted, base.truth, present),
                                     per_class=True)
    best = scores.argmax(axis=1)
    return [grid[j] for j in best], [float(scores[k, j]) for k, j in enumerate(best)]


@dataclass
class SearchResult:
    """The chosen per-class post-processing and the Kaggle metric before and after."""

    thresholds: list[float]
    min_areas: list[int]
    kaggle_per_class: list[float]
    kaggle: float
    baseline_thresholds: list[float]
    baseline_min_areas: list[int]
    baseline_kaggle_per_class: list[float]
    baseline_kaggle: float
    threshold_grid: list[float]
    min_area_grid: list[int]
    images: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": self.thresholds,
            "min_areas": self.min_areas,
            "objective": "kaggle",
            "images": self.images,
            "kaggle_before": self.baseline_kaggle,
            "kaggle_after": self.kaggle,
            "kaggle_per_class_before": self.baseline_kaggle_per_class,
            "kaggle_per_class_after": self.kaggle_per_class,
            "baseline": {"thresholds": self.baseline_thresholds, "min_areas": self.baseline_min_areas},
            "threshold_grid": self.threshold_grid,
            "min_area_grid": self.min_area_grid,
        }


def grid_scores(stats: ThresholdStats, min_area_grid: Sequence[int], chunk: int = 2048) -> np.ndarray:
    """Kaggle metric per class for every (threshold, min area) pair: ``[C, T, A]``."""
    areas = np.asarray(sorted(set(int(a) for a in min_area_grid)), dtype=np.int64)
    if areas.size == 0 or areas[0] < 0:
        raise ValueError(f"min areas must be a non-empty set of integers >= 0, got {list(min_area_grid)}")
    n, c, t = stats.predicted.shape
    if n == 0:
        raise ValueError("the post-processing search needs at least one image")
    total = np.zeros((c, t, areas.size), dtype=np.float64)
    for start in range(0, n, chunk):
        predicted = stats.predicted[start:start + chunk, :, :, None]
        kept = predicted >= areas.reshape(1, 1, 1, -1)
        dice = pair_dice(
            np.where(kept, stats.intersection[start:start + chunk, :, :, None], 0),
            np.where(kept, predicted, 0),
            stats.truth[start:start + chunk, :, None, None],
        )
        total += dice.sum(axis=0)
    return total / n


def search(
    stats: ThresholdStats,
    min_area_grid: Sequence[int],
    baseline_thresholds: Sequence[float],
    baseline_min_areas: Sequence[int],
) -> SearchResult:
    """Per class, the (threshold, min area) of the grids maximising the Kaggle metric.

    Ties go to the lowest threshold, then the smallest area (the first in grid order). The
    baseline (e.g. the thesis' 0.5 / 200) is scored for the before/after comparison; its
    threshold must be in the grid.
    """
    areas = sorted(set(int(a) for a in min_area_grid))
    scores = grid_scores(stats, areas)  # [C, T, A]
    c, t, a = scores.shape
    best = scores.reshape(c, t * a).argmax(axis=1)
    best_t, best_a = np.unravel_index(best, (t, a))
    thresholds = [float(round(float(stats.thresholds[i]), 6)) for i in best_t]
    min_areas = [int(areas[i]) for i in best_a]
    per_class = scores[np.arange(c), best_t, best_a]
    baseline = kaggle_metric(stats.pixel_stats(baseline_thresholds, baseline_min_areas), per_class=True)
    chosen = kaggle_metric(stats.pixel_stats(thresholds, min_areas), per_class=True)
    # The grid score and the direct recount of the chosen settings are the same arithmetic.
    assert np.allclose(chosen, per_class), (chosen, per_class)
    log.info("post-processing search: Kaggle metric %.4f -> %.4f", float(baseline.mean()), float(chosen.mean()))
    return SearchResult(
        thresholds=thresholds,
        min_areas=min_areas,
        kaggle_per_class=[float(v) for v in chosen],
        kaggle=float(chosen.mean()),
        baseline_thresholds=[float(v) for v in baseline_thresholds],
        baseline_min_areas=[int(v) for v in baseline_min_areas],
        baseline_kaggle_per_class=[float(v) for v in baseline],
        baseline_kaggle=float(baseline.mean()),
        threshold_grid=[float(round(float(v), 6)) for v in stats.thresholds],
        min_area_grid=areas,
        images=len(stats),
    )
