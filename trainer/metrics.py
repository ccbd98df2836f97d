"""Segmentation and label metrics: the thesis' Dice, the Kaggle metric, label accuracy, confusion.

Everything here works on per-(image, class) pixel statistics rather than on masks, so the same
functions score one batch, a whole split, and every candidate of the post-processing search:

- ``intersection[n, c]``: pixels both predicted and true,
- ``predicted[n, c]``: predicted pixels (``>= threshold``),
- ``truth[n, c]``: ground-truth pixels,
- ``present[n, c]``: the predicted label (``predicted >= min_area``, the thesis' presence rule).

Conventions:

- The **Kaggle metric** is the mean Dice over every (image, class) pair, where a pair whose
  prediction and truth are both empty scores 1. A class that is not *present* contributes an
  empty mask: that is what the decision rule means, and what the top Kaggle solutions submitted.
- The **thesis Dice** is the Keras ``dice_coef`` the thesis trained and reported with:
  ``(2 * sum(y * p) + 1) / (sum(y) + sum(p) + 1)`` pooled over every pixel of the set. During
  training it runs on the sigmoid probabilities (soft, as in Keras); at evaluation on the binary
  masks at the frame's full resolution.
- **Label accuracy** is the exact match of an image's label set (sklearn's ``accuracy_score``
  on multi-label rows); **per-class accuracy** scores each class's present/absent decision.
- Confusion matrices are ``[TN, FP, FN, TP]`` per class, as in the thesis' figure 65.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "CONFUSION_FIELDS",
    "PixelStats",
    "Scores",
    "confusion_matrices",
    "dice_from_sums",
    "kaggle_metric",
    "label_accuracy",
    "mask_stats",
    "pair_dice",
    "per_class_accuracy",
    "score",
    "thesis_dice",
]

CONFUSION_FIELDS = ("TN", "FP", "FN", "TP")


def dice_from_sums(intersection: Any, predicted: Any, truth: Any, smooth: float = 1.0) -> np.ndarray:
    """``(2 * intersection + smooth) / (predicted + truth + smooth)``, elementwise."""
    intersection = np.asarray(intersection, dtype=np.float64)
    denominator = np.asarray(predicted, dtype=np.float64) + np.asarray(truth, dtype=np.float64)
    return (2.0 * intersection + smooth) / (denominator + smooth)


def pair_dice(intersection: Any, predicted: Any, truth: Any) -> np.ndarray:
    """Dice of every (image, class) pair; 1 where prediction and truth are both empty."""
    intersection = np.asarray(intersection, dtype=np.float64)
    denominator = np.asarray(predicted, dtype=np.float64) + np.asarray(truth, dtype=np.float64)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, 2.0 * intersection / safe, 1.0)


def _gate(stats: PixelStats) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and predicted counts with absent classes' masks emptied."""
    keep = stats.present.astype(bool)
    return np.where(keep, stats.intersection, 0), np.where(keep, stats.predicted, 0)


def kaggle_metric(stats: PixelStats, per_class: bool = False) -> float | np.ndarray:
    """Mean Dice over every (image, class) pair (1 when both empty); absent classes count as empty.

    With ``per_class`` returns the mean over images for each class ``[C]``; the overall metric is
    their mean (every class has the same number of pairs).
    """
    intersection, predicted = _gate(stats)
    dice = pair_dice(intersection, predicted, stats.truth)
    if per_class:
        return dice.mean(axis=0)
    return float(dice.mean())


def thesis_dice(stats: PixelStats, per_class: bool = False, smooth: float = 1.0) -> float | np.ndarray:
    """The thesis' (Keras ``dice_coef``) Dice pooled over every pixel of the set.

    Uses the thresholded masks as predicted (no minimum-area gate): it scores segmentation, while
    the presence rule is scored by the label metrics.
    """
    axis = 0 if per_class else None
    value = dice_from_sums(
        stats.intersection.sum(axis=axis), stats.predicted.sum(axis=axis), stats.truth.sum(axis=axis), smooth
    )
    return value if per_class else float(value)


def label_accuracy(present: Any, truth_present: Any) -> float:
    """Fraction of images whose whole predicted label set equals the true one (exact match)."""
    present = np.asarray(present, dtype=bool)
    truth_present = np.asarray(truth_present, dtype=bool)
    _check_same_shape(present, truth_present)
    if present.shape[0] == 0:
        raise ValueError("label accuracy of an empty set of images is undefined")
    return float((present == truth_present).all(axis=1).mean())


def per_class_accuracy(present: Any, truth_present: Any) -> np.ndarray:
    """Accuracy of each class's present/absent decision ``[C]``."""
    present = np.asarray(present, dtype=bool)
    truth_present = np.asarray(truth_present, dtype=bool)
    _check_same_shape(present, truth_present)
    if present.shape[0] == 0:
        raise ValueError("per-class accuracy of an empty set of images is undefined")
    return (present == truth_present).mean(axis=0)


def confusion_matrices(present: Any, truth_present: Any) -> np.ndarray:
    """Per-class confusion counts ``[C, 4]`` ordered ``TN, FP, FN, TP``."""
    present = np.asarray(present, dtype=bool)
    truth_present = np.asarray(truth_present, dtype=bool)
    _check_same_shape(present, truth_present)
    tn = (~present & ~truth_present).sum(axis=0)
    fp = (present & ~truth_present).sum(axis=0)
    fn = (~present & truth_present).sum(axis=0)
    tp = (present & truth_present).sum(axis=0)
    return np.stack([tn, fp, fn, tp], axis=1).astype(np.int64)


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [images, classes] arrays of the same shape, got {a.shape} and {b.shape}")


@dataclass
class PixelStats:
    """Per-(image, class) pixel counts of a prediction against the truth; see the module docstring."""

    intersection: np.ndarray
    predicted: np.ndarray
    truth: np.ndarray
    present: np.ndarray

    def __post_init__(self) -> None:
        self.intersection = np.asarray(self.intersection, dtype=np.int64)
        self.predicted = np.asarray(self.predicted, dtype=np.int64)
        self.truth = np.asarray(self.truth, dtype=np.int64)
        self.present = np.asarray(self.present, dtype=bool)
        shapes = {a.shape for a in (self.intersection, self.predicted, self.truth, self.present)}
        if len(shapes) != 1 or self.truth.ndim != 2:
            raise ValueError(f"pixel statistics must all be [images, classes] arrays, got shapes {sorted(shapes)}")
        if (self.intersection > np.minimum(self.predicted, self.truth)).any():
            raise ValueError("intersection exceeds the predicted or true pixel count")

    @property
    def truth_present(self) -> np.ndarray:
        """The true labels: a class is present when its ground-truth mask has any pixel."""
        return self.truth > 0

    @classmethod
    def concatenate(cls, parts: list[PixelStats]) -> PixelStats:
        if not parts:
            raise ValueError("no pixel statistics to concatenate")
        return cls(
            intersection=np.concatenate([p.intersection for p in parts]),
            predicted=np.concatenate([p.predicted for p in parts]),
            truth=np.concatenate([p.truth for p in parts]),
            present=np.concatenate([p.present for p in parts]),
        )

    def __len__(self) -> int:
        return int(self.truth.shape[0])


def mask_stats(masks: Any, truth_masks: Any, present: Any | None = None, min_areas: Any | None = None) -> PixelStats:
    """Pixel statistics of binary masks ``[N, C, H, W]`` (numpy or torch) against the truth.

    ``present`` is the model's own label output; without it, it is derived from ``min_areas``
    (``predicted >= min_area``), and without both every non-empty mask is present.
    """
    masks_t, truth_t = _as_bool_tensor(masks), _as_bool_tensor(truth_masks)
    if tuple(masks_t.shape) != tuple(truth_t.shape) or masks_t.dim() != 4:
        raise ValueError(
            f"predicted and true masks must both be [N, C, H, W] of the same shape, got "
            f"{list(masks_t.shape)} and {list(truth_t.shape)}"
        )
    if truth_t.device != masks_t.device:
        truth_t = truth_t.to(masks_t.device)
    # Reduced where the masks live (a GPU's outputs stay there); only [N, C] counts come back.
    intersection = (masks_t & truth_t).sum(dim=(2, 3)).cpu().numpy()
    predicted = masks_t.sum(dim=(2, 3)).cpu().numpy()
    truth = truth_t.sum(dim=(2, 3)).cpu().numpy()
    if present is None:
        areas = np.ones(predicted.shape[1], dtype=np.int64) if min_areas is None else np.asarray(min_areas)
        present = predicted >= areas.reshape(1, -1)
    else:
        present = np.asarray(present.cpu() if hasattr(present, "cpu") else present, dtype=bool)
    return PixelStats(intersection, predicted, truth, present)


def _as_bool_tensor(x: Any):
    if isinstance(x, torch.Tensor):
        return x.detach() != 0
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x)) != 0)


@dataclass
class Scores:
    """Every metric the evaluation reports, for one split and one post-processing rule."""

    images: int
    kaggle: float
    kaggle_per_class: list[float]
    thesis_dice: float
    thesis_dice_per_class: list[float]
    label_accuracy: float
    per_class_accuracy: list[float]
    mean_class_accuracy: float
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "kaggle": self.kaggle,
            "kaggle_per_class": self.kaggle_per_class,
            "thesis_dice": self.thesis_dice,
            "thesis_dice_per_class": self.thesis_dice_per_class,
            "label_accuracy": self.label_accuracy,
            "per_class_accuracy": self.per_class_accuracy,
            "mean_class_accuracy": self.mean_class_accuracy,
            "confusion": {"fields": list(CONFUSION_FIELDS), "per_class": self.confusion},
        }


def score(stats: PixelStats) -> Scores:
    """All metrics of one set of pixel statistics."""
    class_accuracy = per_class_accuracy(stats.present, stats.truth_present)
    return Scores(
        images=len(stats),
        kaggle=float(kaggle_metric(stats)),
        kaggle_per_class=[float(v) for v in kaggle_metric(stats, per_class=True)],
        thesis_dice=float(thesis_dice(stats)),
        thesis_dice_per_class=[float(v) for v in thesis_dice(stats, per_class=True)],
        label_accuracy=label_accuracy(stats.present, stats.truth_present),
        per_class_accuracy=[float(v) for v in class_accuracy],
        mean_class_accuracy=float(class_accuracy.mean()),
        confusion=confusion_matrices(stats.present, stats.truth_present).tolist(),
    )
