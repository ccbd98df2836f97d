"""Connected components (8-connectivity) of one mask, with what a defect record needs of each.

:func:`label` gives each component's box, pixel count, owned pixel count (pixels in the columns
that count towards areas), largest probability inside and box mask. Where numba is installed (the
``cpu`` extra) a compiled run-based labelling does it in one pass over the pixels
(:mod:`coils.labelling_kernel`); elsewhere OpenCV's ``connectedComponentsWithStats`` does, with
the per-component work in numpy. Both give the same components in the same order, OpenCV's: by the
first 2x2 block, in raster order over the box of the set pixels, that holds a pixel of the
component (OpenCV's block-based labelling numbers them so). The order matters beyond taste: a
component's number in its frame is part of its key in the coil store, so a frame resent to a
server of either kind must get the same numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

try:
    from coils import labelling_kernel
except ImportError:  # numba is not installed: OpenCV labels
    labelling_kernel = None  # type: ignore[assignment]

#: Columns of :attr:`Labelled.stats`.
TOP, LEFT, HEIGHT, WIDTH, PIXELS, OWNED = range(6)


class Labelled(NamedTuple):
    """The components of one mask, in OpenCV's order.

    Attributes:
        stats: int64 ``[n, 6]``: top, left, height, width (the box, in the mask's pixels), pixels,
            owned pixels.
        peaks: float32 ``[n]``: the largest probability inside each; None without probabilities.
        crops: each component's bool box mask ``[height, width]`` (other components' pixels clear).
        packed: each crop as :func:`coils.records.pack_mask` packs it, where packing came free (the
            compiled labelling packs all crops at once); None where it did not.
    """

    stats: np.ndarray
    peaks: np.ndarray | None
    crops: list[np.ndarray]
    packed: list[bytes] | None = None


def label(grid: np.ndarray, owned: np.ndarray, probs: np.ndarray | None = None, compiled: bool = True) -> Labelled:
    """The components of ``grid`` (2-D, uint8 or bool, nonzero = set).

    Args:
        owned: bool ``[grid.shape[1]]``: the columns whose pixels count as owned.
        probs: float32 like ``grid``: the class probability, for each component's maximum; or None.
        compiled: False forces OpenCV even where numba is installed (the tests compare the two).
    """
    if grid.dtype != np.uint8:
        grid = grid.view(np.uint8) if grid.dtype == bool else (grid > 0).astype(np.uint8)
    if compiled and labelling_kernel is not None:
        return _label_compiled(grid, owned, probs)
    return _label_opencv(grid, owned, probs)


def warm_up() -> None:
    """Compiles the labelling now: seconds where numba's disk cache is cold, better at start than on a frame."""
    if labelling_kernel is not None:
        label(np.ones((2, 9), np.uint8), np.ones(9, bool), np.ones((2, 9), np.float32))


def _label_compiled(grid: np.ndarray, owned: np.ndarray, probs: np.ndarray | None) -> Labelled:
    has_probs = probs is not None
    if grid.strides[1] != 1:  # a transposed frame (along = x): rows of contiguous bytes are read 8 at a time
        grid = np.ascontiguousarray(grid)
    # C-ordered arguments only: one compiled specialisation, the one warm_up compiles.
    words = np.ascontiguousarray(grid[:, :grid.shape[1] // 8 * 8]).view(np.uint64)
    probs = np.ascontiguousarray(probs, np.float32) if has_probs else _NO_PROBS
    stats, peaks, offsets, crops = labelling_kernel.label_runs(
        grid, words, np.ascontiguousarray(owned, bool), probs, has_probs)
    bits = np.packbits(crops)
    starts = offsets.tolist()
    crop_list, packed = [], []
    for start, (height, width) in zip(starts, stats[:, HEIGHT:WIDTH + 1].tolist()):
        crop_list.append(crops[start:start + height * width].reshape(height, width))
        packed.append(bits[start // 8:(start + height * width + 7) // 8].tobytes())
    return Labelled(stats, peaks if has_probs else None, crop_list, packed)


_NO_PROBS = np.zeros((1, 1), np.float32)


def _label_opencv(grid: np.ndarray, owned: np.ndarray, probs: np.ndarray | None) -> Labelled:
    rows = grid.any(axis=1)
    if not rows.any():
        return Labelled(np.zeros((0, 6), np.int64), None if probs is None else np.zeros(0, np.float32), [])
    # Labelled within the box of the set pixels: the same components, a fraction of the work.
    cols = np.flatnonzero(grid.any(axis=0))
    rows = np.flatnonzero(rows)
    r0, c0 = int(rows[0]), int(cols[0])
    box = np.ascontiguousarray(grid[r0:rows[-1] + 1, c0:cols[-1] + 1])
    count, labels, cv_stats, _ = cv2.connectedComponentsWithStats(box, connectivity=8)
    stats = np.zeros((count - 1, 6), np.int64)
    peaks = None if probs is None else np.zeros(count - 1, np.float32)
    crops = []
    for label_no in range(1, count):
        left, top, width, height, pixels = (int(v) for v in cv_stats[label_no, :5])
        crop = labels[top:top + height, left:left + width] == label_no
        top, left = top + r0, left + c0
        stats[label_no - 1] = (top, left, height, width, pixels, int(crop[:, owned[left:left + width]].sum()))
        if peaks is not None:
            peaks[label_no - 1] = probs[top:top + height, left:left + width][crop].max()
        crops.append(crop)
    return Labelled(stats, peaks, crops)


__all__ = ["HEIGHT", "LEFT", "Labelled", "OWNED", "PIXELS", "TOP", "WIDTH", "label", "warm_up"]
