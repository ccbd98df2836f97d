"""The capture folder on disk: its layout, the rows of one capture, its size, its repair after a crash.

A Severstal-format folder, so that after review it trains as it is
(``trainer fit --data ORIGINAL --data DIR``)::

    DIR/train_images/<ImageId>   the frame: the camera's original JPEG/PNG bytes, or a raw frame
                                 encoded losslessly as PNG
    DIR/predictions.csv          ImageId,ClassId,EncodedPixels: every non-empty class mask the model
                                 predicted, present or not (a reviewer sees the near misses too)
    DIR/train.csv                ImageId,ClassId,EncodedPixels: the classes the model called present;
                                 these ARE the training labels until a person reviews and corrects them
    DIR/captures.csv             ImageId,CameraId,FrameId,CapturedAtNs,ModelVersion,Reason,PixelCounts,Labels

:class:`server.capture.CaptureWriter` writes it; this module owns its names and rows.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.files import atomic_write

log = logging.getLogger(__name__)

IMAGES_DIR = "train_images"
PREDICTIONS_FILE = "predictions.csv"
LABELS_FILE = "train.csv"
CAPTURES_FILE = "captures.csv"
ANNOTATION_HEADER = ("ImageId", "ClassId", "EncodedPixels")
CAPTURES_HEADER = (
    "ImageId", "CameraId", "FrameId", "CapturedAtNs", "ModelVersion", "Reason", "PixelCounts", "Labels",
)
HEADERS = {PREDICTIONS_FILE: ANNOTATION_HEADER, LABELS_FILE: ANNOTATION_HEADER, CAPTURES_FILE: CAPTURES_HEADER}


@dataclass
class Capture:
    """One chosen frame on its way to the folder: the frame, where it came from, what the model said."""

    frame: bytes | np.ndarray
    suffix: str
    stem: str
    camera_id: str
    frame_id: int
    time_ns: int
    model_version: str
    reason: str
    rles: tuple[str, ...]
    counts: tuple[int, ...]
    present: tuple[bool, ...]

    def rows(self, image_id: str) -> dict[str, bytes]:
        """The CSV bytes this capture appends to each file, saved as ``image_id``."""
        predictions = [(image_id, k + 1, r) for k, r in enumerate(self.rles) if r]
        labels = [(image_id, k + 1, r) for k, r in enumerate(self.rles) if r and self.present[k]]
        capture = (
            image_id, self.camera_id, self.frame_id, self.time_ns, self.model_version, self.reason,
            " ".join(map(str, self.counts)), " ".join(str(k + 1) for k, p in enumerate(self.present) if p),
        )
        return {
            PREDICTIONS_FILE: csv_bytes(predictions),
            LABELS_FILE: csv_bytes(labels),
            CAPTURES_FILE: csv_bytes([capture]),
        }


def csv_bytes(rows: Sequence[Sequence[Any]]) -> bytes:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue().encode("utf-8")


def folder_bytes(directory: Path) -> int:
    """Bytes of every file under ``directory`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed while walking
                continue
    return total


def repair_csv(path: Path, header: tuple[str, ...], images: set[str]) -> None:
    """Creates ``path`` with ``header``, or repairs what a crash left: a half-written last line and
    rows naming an image that never made it to ``train_images/``.

    Raises:
        ValueError: the file exists with another header (not a capture folder of this layout).
    """
    if not path.exists() or path.stat().st_size == 0:
        path.write_bytes(csv_bytes([header]))
        return
    text = path.read_bytes().decode("utf-8-sig")
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(complete)))
    if not rows or tuple(c.strip() for c in rows[0]) != header:
        raise ValueError(f"{path}: header is {rows[0] if rows else 'missing'}, expected {','.join(header)}")
    kept = [r for r in rows[1:] if r and r[0] in images]
    dropped = len(rows) - 1 - len(kept)
    if dropped or complete != text:
        log.warning("%s: removed %d rows of captures interrupted before their image was saved%s", path, dropped,
                    " and a half-written last line" if complete != text else "")
        atomic_write(path, csv_bytes([header, *kept]))
