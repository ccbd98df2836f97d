"""What the data looks like (:class:`DataConfig`) and a training image with its per-class masks
(:class:`Sample`), as data loading, splitting and balancing see them.

Its own module (numpy only) so that :mod:`trainer.data` (which imports torch for the dataset),
:mod:`trainer.balance` and :mod:`trainer.splits` all import it without importing one another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.metadata import default_class_names

#: A data folder's annotations: ``DIR/train.csv`` (ImageId,ClassId,EncodedPixels) beside ``DIR/train_images/``.
ANNOTATIONS_FILE = "train.csv"
IMAGES_DIR = "train_images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Largest image a training folder may hold (the server's default frame pixel limit).
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class DataConfig:
    """What the data looks like: class count and the camera frame size.

    Attributes:
        num_classes: defect classes C; class ids in the CSV are 1..C.
        height, width: the camera frame size every image must have.
        class_names: one name per class; defaults to the Severstal names for 4 classes,
            ``"class k"`` otherwise.
    """

    num_classes: int = 4
    height: int = 256
    width: int = 1600
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"frame size must be positive, got {self.height}x{self.width}")
        if self.class_names is None:
            object.__setattr__(self, "class_names", tuple(default_class_names(self.num_classes)))
        else:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names, expected num_classes={self.num_classes}"
            )

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of a camera frame."""
        return (self.height, self.width)

    def scaled_size(self, scale: float) -> tuple[int, int]:
        """(height, width) after downscaling by ``scale`` (0.5 = the thesis' 128x800)."""
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        h, w = round(self.height * scale), round(self.width * scale)
        if h < 1 or w < 1:
            raise ValueError(f"scale {scale} shrinks {self.height}x{self.width} frames to {h}x{w}")
        return (h, w)


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
