"""The decision defaults: the thesis' rule, used wherever no searched post-processing exists yet.

A pixel is a defect when its probability reaches the threshold; a class is present when its
pixels reach the minimum area. ``trainer evaluate --split oof`` searches per-class values; a model
carries its own in its metadata. These are only the starting point. The empty-frame gate (the folds'
class heads, ``trainer fit --gate``) has its own default threshold on the mean class probability.
"""

from __future__ import annotations

#: Probability at or above which a pixel is a defect.
DEFAULT_THRESHOLD = 0.5
#: Defect pixels (at the camera's resolution) at or above which a class is present.
DEFAULT_MIN_AREA = 200
#: Mean gate-head class probability at or above which the gate lets a class be present.
DEFAULT_GATE_THRESHOLD = 0.5


def default_thresholds(num_classes: int) -> list[float]:
    return [DEFAULT_THRESHOLD] * num_classes


def default_min_areas(num_classes: int) -> list[int]:
    return [DEFAULT_MIN_AREA] * num_classes


def default_gate_thresholds(num_classes: int) -> list[float]:
    return [DEFAULT_GATE_THRESHOLD] * num_classes
