"""Which components are one defect: touching pixels (:func:`pixels_touch`) and disjoint sets (:class:`UnionFind`).

The merge rule of :mod:`coils.records`: components of different frames of one coil and class whose
pixels lie within ``gap_mm`` of each other are one defect. Boxes are compared first
(:func:`boxes_meet`, cheap); only components whose boxes meet are rasterised.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from coils.records import Component

#: Floating-point slack when comparing millimetre positions computed from pixel indices.
EPSILON_MM = 1e-6


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


def pixels_touch(a: Component, b: Component, gap_mm: float) -> bool:
    """Whether a pixel of ``a`` and one of ``b`` lie within ``gap_mm`` of each other (gap 0: sharing an
    edge or a corner, 8-connectivity), on a grid of the finer of the two pixel sizes."""
    if not boxes_meet(a, b, gap_mm):
        return False
    cell = min(a.mm_per_px_along, a.mm_per_px_across, b.mm_per_px_along, b.mm_per_px_across)
    reach = int(math.floor(gap_mm / cell + EPSILON_MM)) + 1  # cells of dilation: 1 = the 8 neighbours
    along0 = max(a.along_start_mm, b.along_start_mm) - (reach + 1) * cell
    across0 = max(a.across_start_mm, b.across_start_mm) - (reach + 1) * cell
    along1 = min(a.along_end_mm, b.along_end_mm) + (reach + 1) * cell
    across1 = min(a.across_end_mm, b.across_end_mm) + (reach + 1) * cell
    shape = (max(1, math.ceil((along1 - along0) / cell)), max(1, math.ceil((across1 - across0) / cell)))
    raster_a = _raster(a, along0, across0, cell, shape)
    raster_b = _raster(b, along0, across0, cell, shape)
    kernel = np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)
    return bool((cv2.dilate(raster_a, kernel) & raster_b).any())


class UnionFind:
    """Disjoint sets over 0, 1, 2...: union by size, path halving."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        self.size.append(1)
        return len(self.parent) - 1

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


__all__ = ["EPSILON_MM", "UnionFind", "boxes_meet", "pixels_touch"]
