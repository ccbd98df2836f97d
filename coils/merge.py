"""Which components are one defect: touching pixels (:func:`pixels_touch`) and disjoint sets (:class:`UnionFind`).

The merge rule of :mod:`coils.records`: components of different frames of one coil and class whose
pixels lie within ``gap_mm`` of each other are one defect. Boxes are compared first
(:func:`boxes_meet`, cheap); only components whose boxes meet are rasterised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from itertools import chain
from operator import attrgetter
from typing import Protocol

import cv2
import numpy as np

#: Floating-point slack when comparing millimetre positions computed from pixel indices.
EPSILON_MM = 1e-6


class Component(Protocol):
    """What the touch test and :class:`Boxes` read of a :class:`coils.records.Component`: its box mask, where it
    lies, its class."""

    mask: np.ndarray
    class_id: int
    along_start_mm: float
    across_start_mm: float
    mm_per_px_along: float
    mm_per_px_across: float

    @property
    def along_end_mm(self) -> float: ...

    @property
    def across_end_mm(self) -> float: ...

    @property
    def box_shape(self) -> tuple[int, int]: ...


def _raster(component: Component, along0: float, across0: float, cell: float, shape: tuple[int, int]) -> np.ndarray:
    """``component``'s pixels sampled at the centres of a ``cell``-mm grid starting at (along0, across0)."""
    along = along0 + (np.arange(shape[0]) + 0.5) * cell
    across = across0 + (np.arange(shape[1]) + 0.5) * cell
    rows = np.floor((along - component.along_start_mm) / component.mm_per_px_along).astype(np.int64)
    cols = np.floor((across - component.across_start_mm) / component.mm_per_px_across).astype(np.int64)
    inside_rows = (rows >= 0) & (rows < component.mask.shape[0])
    inside_cols = (cols >= 0) & (cols < component.mask.shape[1])
    raster = np.zeros(shape, dtype=np.uint8)
    if inside_rows.any() and inside_cols.any():
        picked = component.mask[np.ix_(rows[inside_rows], cols[inside_cols])]
        raster[np.ix_(inside_rows, inside_cols)] = picked
    return raster


def boxes_meet(a: Component, b: Component, gap_mm: float) -> bool:
    """Whether the two boxes overlap or lie within ``gap_mm`` of each other along and across."""
    slack = gap_mm + EPSILON_MM
    return (a.along_start_mm <= b.along_end_mm + slack and b.along_start_mm <= a.along_end_mm + slack
            and a.across_start_mm <= b.across_end_mm + slack and b.across_start_mm <= a.across_end_mm + slack)


def _grid_offset(a: Component, b: Component, cell: float) -> tuple[int, int] | None:
    """``b``'s box start in ``a``'s pixels when both have square pixels of ``cell`` mm on one grid, else None.

    The usual case (frames of one line at encoder steps of whole pixels): the cell grid of
    :func:`pixels_touch` is then the pixels themselves, and no resampling is needed.
    """
    if not (a.mm_per_px_along == a.mm_per_px_across == b.mm_per_px_along == b.mm_per_px_across == cell):
        return None
    rows = (b.along_start_mm - a.along_start_mm) / cell
    cols = (b.across_start_mm - a.across_start_mm) / cell
    if abs(rows - round(rows)) * cell > EPSILON_MM or abs(cols - round(cols)) * cell > EPSILON_MM:
        return None
    return round(rows), round(cols)


def _touch_on_grid(a: np.ndarray, b: np.ndarray, offset: tuple[int, int], reach: int) -> bool:
    """Whether a pixel of ``b`` (its box at ``offset`` pixels from ``a``'s) lies within ``reach`` pixels
    (Chebyshev) of a pixel of ``a``: what the rasters of :func:`pixels_touch` decide, without resampling."""
    rows, cols = offset
    # The part of b's box within reach of a's box, in a's pixels.
    top, bottom = max(rows, -reach), min(rows + b.shape[0], a.shape[0] + reach)
    left, right = max(cols, -reach), min(cols + b.shape[1], a.shape[1] + reach)
    if top >= bottom or left >= right:
        return False
    # Only a's pixels within reach of that part matter (a long scratch meets its neighbour at one end).
    a_top, a_bottom = max(top - reach, 0), min(bottom + reach, a.shape[0])
    a_left, a_right = max(left - reach, 0), min(right + reach, a.shape[1])
    if a_top >= a_bottom or a_left >= a_right:
        return False
    padded = np.zeros((a_bottom - a_top + 2 * reach, a_right - a_left + 2 * reach), np.uint8)
    padded[reach:reach + a_bottom - a_top, reach:reach + a_right - a_left] = a[a_top:a_bottom, a_left:a_right]
    grown = cv2.dilate(padded, np.ones((2 * reach + 1, 2 * reach + 1), np.uint8))
    near = grown[top - a_top + reach:bottom - a_top + reach, left - a_left + reach:right - a_left + reach]
    return bool((near.astype(bool) & b[top - rows:bottom - rows, left - cols:right - cols]).any())


def pixels_touch(a: Component, b: Component, gap_mm: float) -> bool:
    """Whether a pixel of ``a`` and one of ``b`` lie within ``gap_mm`` of each other (gap 0: sharing an
    edge or a corner, 8-connectivity), on a grid of the finer of the two pixel sizes."""
    if not boxes_meet(a, b, gap_mm):
        return False
    cell = min(a.mm_per_px_along, a.mm_per_px_across, b.mm_per_px_along, b.mm_per_px_across)
    reach = int(math.floor(gap_mm / cell + EPSILON_MM)) + 1  # cells of dilation: 1 = the 8 neighbours
    offset = _grid_offset(a, b, cell)
    if offset is not None:
        return _touch_on_grid(a.mask, b.mask, offset, reach)
    return touch_resampled(a, b, cell, reach)


def touch_resampled(a: Component, b: Component, cell: float, reach: int) -> bool:
    """:func:`pixels_touch` for any pixel sizes and positions: both rasterised on a ``cell``-mm grid over the
    window where their boxes meet, ``a`` dilated by ``reach`` cells, a shared cell found or not."""
    along0 = max(a.along_start_mm, b.along_start_mm) - (reach + 1) * cell
    across0 = max(a.across_start_mm, b.across_start_mm) - (reach + 1) * cell
    along1 = min(a.along_end_mm, b.along_end_mm) + (reach + 1) * cell
    across1 = min(a.across_end_mm, b.across_end_mm) + (reach + 1) * cell
    shape = (max(1, math.ceil((along1 - along0) / cell)), max(1, math.ceil((across1 - across0) / cell)))
    raster_a = _raster(a, along0, across0, cell, shape)
    raster_b = _raster(b, along0, across0, cell, shape)
    kernel = np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)
    return bool((cv2.dilate(raster_a, kernel) & raster_b).any())


def candidate_pairs(along_start: np.ndarray, along_end: np.ndarray, across_start: np.ndarray,
                    across_end: np.ndarray, frames: np.ndarray, gap_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` of boxes of different frames that :func:`boxes_meet` may join, found in one sweep.

    Sorted by along start, each box is paired with the boxes that start before its end (plus the
    gap), then the pairs are filtered across and by frame: O(n log n + pairs) in numpy, where a
    lookup per box would cost a Python loop over its neighbours. Every pair whose boxes meet is in
    the result (the same inequalities as :func:`boxes_meet`); the pixels decide afterwards.

    Args:
        frames: an integer per box naming its frame; pairs within one frame are left out.
    """
    slack = gap_mm + EPSILON_MM
    order = np.argsort(along_start, kind="stable")
    first, second = _sweep(along_start[order], along_end[order] + slack)
    i, j = order[first], order[second]
    keep = ((across_start[i] <= across_end[j] + slack) & (across_start[j] <= across_end[i] + slack)
            & (frames[i] != frames[j]))
    return i[keep], j[keep]


def _sweep(starts: np.ndarray, reach: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, of the sorted ``starts`` with ``starts[j] <= reach[i]``, in numpy."""
    last = np.searchsorted(starts, reach, side="right")  # entries i+1 .. last[i]-1 start in reach
    counts = np.maximum(last - np.arange(1, len(starts) + 1), 0)
    first = np.repeat(np.arange(len(starts)), counts)
    second = first + 1 + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return first, second


@dataclass(frozen=True)
class Boxes:
    """Component boxes as columns: extents in mm, class, a number per frame, and each one's component number."""

    along_start: np.ndarray
    along_end: np.ndarray
    across_start: np.ndarray
    across_end: np.ndarray
    classes: np.ndarray
    frames: np.ndarray
    numbers: np.ndarray

    def __len__(self) -> int:
        return len(self.numbers)

    def take(self, index: np.ndarray | slice) -> Boxes:
        return Boxes(*(getattr(self, f.name)[index] for f in fields(self)))

    @classmethod
    def of(cls, components: Sequence[Component], frames: np.ndarray, first: int) -> Boxes:
        """The boxes of ``components``, numbered from ``first``; ``frames`` a number per component naming its frame."""
        count = len(components)
        # read with C-level getters into fromiter: a third of the time of np.array over a list of tuples
        values = np.fromiter(chain.from_iterable(map(_BOX_VALUES, components)), np.float64, 5 * count).reshape(-1, 5)
        shapes = np.fromiter(chain.from_iterable([c.box_shape for c in components]), np.int64, 2 * count).reshape(-1, 2)
        along, across, per_along, per_across, classes = values.T
        # the same sums as Component.along_end_mm and across_end_mm, so the same floats
        return cls(along, along + shapes[:, 0] * per_along, across, across + shapes[:, 1] * per_across,
                   classes.astype(np.int64), frames, np.arange(first, first + count))

    @classmethod
    def concatenate(cls, parts: list[Boxes]) -> Boxes:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


_BOX_VALUES = attrgetter("along_start_mm", "across_start_mm", "mm_per_px_along", "mm_per_px_across", "class_id")


@dataclass(frozen=True)
class _Chunk:
    boxes: Boxes  # sorted by along start
    longest: float  # the longest box along
    end: float  # the largest along end


class BoxIndex:
    """Boxes of one coil added batch by batch: each new batch's candidate pairs with itself and with every box
    before it (what :func:`candidate_pairs` gives over all boxes, restricted to pairs with a new one, and of
    one class).

    Why not :func:`candidate_pairs` on the new boxes and their along neighbours: across a wide strip every
    lane's boxes start along within one defect's length of each other, and the pairs a sweep along makes
    would be counted in hundreds of thousands per batch. Here the sweep runs per class and across cell
    (:data:`CELL_MM`, a box entered in every cell it reaches), so it pairs only near neighbours. Earlier
    boxes are kept in chunks sorted along (one per batch, small ones joined), and only the part of a chunk
    within reach of the batch along is looked at: frames in any order, the work near the batch's length.
    """

    #: Across width of a sweep's cell; fewer than ten boxes of a class are in one at bench density.
    CELL_MM = 128.0
    #: A chunk under this many boxes takes the next batch in (per-frame adds stay a few chunks).
    CHUNK = 4096

    def __init__(self, gap_mm: float) -> None:
        self.slack = gap_mm + EPSILON_MM
        self._chunks: list[_Chunk] = []

    def add(self, boxes: Boxes) -> tuple[np.ndarray, np.ndarray]:
        """Adds ``boxes``; returns the component numbers ``(earlier, later)`` of every pair with a new box whose
        boxes may meet (a superset of :func:`boxes_meet`'s pairs, within one class, of different frames)."""
        if not len(boxes):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        near = self._near(float(boxes.along_start.min()), float(boxes.along_end.max()))
        both = Boxes.concatenate([*near, boxes])
        i, j = self._pairs(both)
        earlier = sum(len(b) for b in near)
        keep = (i >= earlier) | (j >= earlier)
        a, b = both.numbers[i[keep]], both.numbers[j[keep]]
        self._store(boxes)
        return np.minimum(a, b), np.maximum(a, b)

    def _near(self, start: float, end: float) -> list[Boxes]:
        """The stored boxes whose extent along may meet ``[start, end]`` (a superset, within the gap)."""
        parts = []
        for chunk in self._chunks:
            if chunk.end + self.slack < start or chunk.boxes.along_start[0] > end + self.slack:
                continue
            # a box starting before ``low`` ends before ``start - slack``; margin for the sums' rounding
            low = start - self.slack - chunk.longest - EPSILON_MM
            first, last = np.searchsorted(chunk.boxes.along_start, [low, end + self.slack], side="right")
            if last > first:
                parts.append(chunk.boxes.take(slice(int(first), int(last))))
        return parts

    def _store(self, boxes: Boxes) -> None:
        if self._chunks and len(self._chunks[-1].boxes) < self.CHUNK:
            boxes = Boxes.concatenate([self._chunks.pop().boxes, boxes])
        boxes = boxes.take(np.argsort(boxes.along_start, kind="stable"))
        self._chunks.append(_Chunk(boxes, float((boxes.along_end - boxes.along_start).max()),
                                   float(boxes.along_end.max())))

    def _pairs(self, boxes: Boxes) -> tuple[np.ndarray, np.ndarray]:
        """Index pairs of ``boxes`` of one class and different frames that may meet: a sweep along per across cell."""
        slack = self.slack
        low = np.floor((boxes.across_start - slack) / self.CELL_MM).astype(np.int64)
        high = np.floor((boxes.across_end + slack) / self.CELL_MM).astype(np.int64)
        spans = high - low + 1
        entry = np.repeat(np.arange(len(boxes)), spans)  # a box once per cell it reaches
        cell = low[entry] + np.arange(len(entry)) - np.repeat(np.cumsum(spans) - spans, spans)
        order = np.lexsort((boxes.along_start[entry], cell, boxes.classes[entry]))
        entry, cell = entry[order], cell[order]
        group = np.cumsum(np.r_[True, (cell[1:] != cell[:-1]) | (boxes.classes[entry[1:]] != boxes.classes[entry[:-1]])])
        # one sorted key: groups apart by more than any reach, the along start within (1e-3 mm margin for rounding)
        origin = float(boxes.along_start.min())
        stride = float(boxes.along_end.max()) - origin + 2 * slack + 1.0
        key = group * stride + (boxes.along_start[entry] - origin)
        first, second = _sweep(key, group * stride + (boxes.along_end[entry] - origin) + slack + 1e-3)
        i, j = entry[first], entry[second]
        # a pair reaching into several common cells is kept in the first of them only
        keep = ((cell[first] == np.maximum(low[i], low[j])) & (boxes.frames[i] != boxes.frames[j])
                & (boxes.across_start[i] <= boxes.across_end[j] + slack)
                & (boxes.across_start[j] <= boxes.across_end[i] + slack))
        return i[keep], j[keep]


class UnionFind:
    """Disjoint sets over 0, 1, 2...: union by size, path halving."""

    def __init__(self, count: int = 0) -> None:
        self.parent: list[int] = list(range(count))
        self.size: list[int] = [1] * count

    def add(self, count: int = 1) -> range:
        """``count`` new sets of one element each; returns their elements."""
        added = range(len(self.parent), len(self.parent) + count)
        self.parent += added
        self.size += [1] * count
        return added

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


__all__ = ["EPSILON_MM", "BoxIndex", "Boxes", "UnionFind", "boxes_meet", "candidate_pairs", "pixels_touch", "touch_resampled"]
