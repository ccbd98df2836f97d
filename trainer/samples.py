"""A training image and its per-class masks, as data loading, splitting and balancing see it.

Its own module (numpy only) so that :mod:`trainer.data` (which imports torch for the dataset),
:mod:`trainer.balance` and :mod:`trainer.splits` all import it without importing one another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: A data folder's annotations: ``DIR/train.csv`` (ImageId,ClassId,EncodedPixels) beside ``DIR/train_images/``.
ANNOTATIONS_FILE = "train.csv"


@dataclass(frozen=True)
class Sample:
    """One training image and its per-class RLE masks.

    Attributes:
        image_id: the file name, e.g. ``"0002cc93b.jpg"``.
        path: the image file.
        rles: one RLE per class (``""`` = no defect of that class); ``len == num_classes``.
        source: the data folder the image came from.
    """

    image_id: str
    path: Path
    rles: tuple[str, ...]
    source: Path

    @property
    def labels(self) -> tuple[int, ...]:
        """The 1-based ids of the classes present in this image."""
        return tuple(k + 1 for k, r in enumerate(self.rles) if r)


def label_matrix(samples: Sequence[Sample], num_classes: int) -> np.ndarray:
    """bool ``[N, C]``: ``[i, k]`` is True when image i has a defect of class k+1."""
    out = np.zeros((len(samples), num_classes), dtype=bool)
    for i, s in enumerate(samples):
        if len(s.rles) != num_classes:
            raise ValueError(f"image {s.image_id} has {len(s.rles)} class masks, expected {num_classes}")
        out[i] = [bool(r) for r in s.rles]
    return out
