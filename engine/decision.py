"""The decision defaults: the thesis' rule, used wherever no searched post-processing exists yet.

A pixel is a defect when its probability reaches the threshold; a class is present when its
pixels reach the minimum area. ``trainer evaluate --split oof`` searches per-class values; a model
carries its own in its metadata. These are only the starting point.
"""

from __future__ import annotations

#: Probability at or above which a pixel is a defect.
DEFAULT_THRESHOLD = 0.5
#: Defect pixels (at the camera's resolution) at or above which a class is present.
DEFAULT_MIN_AREA = 200


def default_thresholds(num_classes: int) -> list[float]:
    return [DEFAULT_THRESHOLD] * num_classes


def default_min_areas(num_classes: int) -> list[int]:
    return [DEFAULT_MIN_AREA] * num_classes
