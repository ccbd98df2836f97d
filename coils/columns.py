"""A coil's stored components as columns, merged into its defect records at once (what the store does at close).

:class:`coils.records.RecordBuilder` merges frame by frame, one :class:`~coils.records.Component` at a
time, which is right for frames arriving. A store closing a coil has every component at once, as the
columns of its table; :func:`merged_records` gives the same records by the same rule (boxes that may
meet from :func:`coils.merge.candidate_pairs`, then :func:`coils.merge.pixels_touch`, union-find) while
making Python objects only where needed: a Component, with its mask unpacked, only for the components
whose boxes meet another's, and one record per set. A 40,000-frame coil is closed in a fraction of
the time the builder takes (``bench coil-close``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import numpy as np

from coils.merge import UnionFind, candidate_pairs, pixels_touch
from coils.records import (
    Component,
    DefectRecord,
    FrameKey,
    check_packed,
    pack_mask,
    packed_component,
    record_of,
    unpack_mask,
)

# What ComponentColumns.of reads of each component, with C-level getters (no Python call per component). The mask's
# shape is read from the mask: a component made by labelling has it; one still packed is unpacked (right, slower).
_FLOATS = attrgetter("along_start_mm", "across_start_mm", "mm_per_px_along", "mm_per_px_across", "area_mm2")
_INTEGERS = attrgetter("class_id", "pixel_count")
_SHAPE, _BITS = attrgetter("mask.shape"), attrgetter("mask_bits")
_CAMERA, _FRAME, _PEAK = attrgetter("key.camera_id"), attrgetter("key.frame_id"), attrgetter("max_probability")


@dataclass(frozen=True)
class ComponentColumns:
    """The components of one coil, one entry per component in every column (see :class:`Component`).

    ``mask_shapes`` is ``[n, 2]`` (rows along, columns across) and ``packed_masks`` the masks as
    :func:`coils.records.pack_mask` stored them.
    """

    coil_id: str
    camera_ids: Sequence[str]
    frame_ids: Sequence[int]
    class_ids: np.ndarray
    along_start_mm: np.ndarray
    across_start_mm: np.ndarray
    mm_per_px_along: np.ndarray
    mm_per_px_across: np.ndarray
    pixel_counts: np.ndarray
    area_mm2: np.ndarray
    max_probability: Sequence[float | None]
    mask_shapes: np.ndarray
    packed_masks: Sequence[bytes]

    @classmethod
    def from_rows(cls, coil_id: str, rows: Sequence[tuple]) -> ComponentColumns:
        """Columns from rows ``(camera_id, frame_id, class_id, along_start_mm, across_start_mm, mm_per_px_along,
        mm_per_px_across, pixel_count, area_mm2, max_probability, mask_rows, mask_cols, packed_mask)``, the rows of
        one frame adjacent."""
        if not rows:
            return cls(coil_id, [], [], *(np.zeros(0) for _ in range(7)), [], np.zeros((0, 2), np.int64), [])
        (cameras, frames, classes, along, across, per_along, per_across, pixels, areas, peaks, mask_rows,
         mask_cols, masks) = zip(*rows)
        floats = [np.asarray(column, np.float64) for column in (along, across, per_along, per_across)]
        return cls(coil_id, cameras, frames, np.asarray(classes, np.int64), *floats, np.asarray(pixels, np.int64),
                   np.asarray(areas, np.float64), peaks, np.stack([mask_rows, mask_cols], axis=1).astype(np.int64),
                   masks)

    @classmethod
    def of(cls, coil_id: str, components: Sequence[Component]) -> ComponentColumns:
        """The columns of ``components`` (of coil ``coil_id``), read without a Python call per component: how the
        serving process sends a call's components to the line watch's process (:mod:`server.watch_wire`)."""
        count = len(components)
        floats = np.fromiter(chain.from_iterable(map(_FLOATS, components)), np.float64, 5 * count).reshape(count, 5)
        integers = np.fromiter(chain.from_iterable(map(_INTEGERS, components)), np.int64, 2 * count).reshape(count, 2)
        shapes = np.fromiter(chain.from_iterable(map(_SHAPE, components)), np.int64, 2 * count).reshape(count, 2)
        masks = list(map(_BITS, components))
        if None in masks:  # components made without their packed mask (OpenCV's labelling)
            masks = [pack_mask(c.mask) if bits is None else bits for c, bits in zip(components, masks)]
        along, across, per_along, per_across, areas = floats.T
        return cls(coil_id, list(map(_CAMERA, components)), list(map(_FRAME, components)), integers[:, 0], along,
                   across, per_along, per_across, integers[:, 1], areas, list(map(_PEAK, components)), shapes, masks)

    def __len__(self) -> int:
        return len(self.camera_ids)

    def packed_components(self) -> list[Component]:
        """Every component as an object, its mask left packed until read (:func:`coils.records.packed_component`):
        what the line watch's process makes of what :meth:`of` sent. Adjacent components of one frame share its key.

        Raises:
            ValueError: a packed mask is not the size its shape needs.
        """
        _check_mask_sizes(self.packed_masks, self.mask_shapes)
        keys, key = [], FrameKey(self.coil_id, "", -1)
        for camera, frame in zip(self.camera_ids, self.frame_ids):
            if frame != key.frame_id or camera != key.camera_id:
                key = FrameKey(self.coil_id, camera, frame)
            keys.append(key)
        rows, columns = self.mask_shapes.T.tolist() if len(self) else ([], [])
        # map calls packed_component from C with the columns as lists: no argument list built per component
        return list(map(packed_component, keys, self.class_ids.tolist(), self.packed_masks, rows, columns,
                        self.along_start_mm.tolist(), self.across_start_mm.tolist(), self.mm_per_px_along.tolist(),
                        self.mm_per_px_across.tolist(), self.pixel_counts.tolist(), self.area_mm2.tolist(),
                        self.max_probability))

    def components(self) -> Callable[[int], Component]:
        """A function giving component ``i`` as an object (its mask unpacked), the columns read as lists once."""
        shapes, classes, pixels = self.mask_shapes.tolist(), self.class_ids.tolist(), self.pixel_counts.tolist()
        along, across, areas = self.along_start_mm.tolist(), self.across_start_mm.tolist(), self.area_mm2.tolist()
        per_along, per_across = self.mm_per_px_along.tolist(), self.mm_per_px_across.tolist()

        def component(i: int) -> Component:
            key = FrameKey(self.coil_id, self.camera_ids[i], self.frame_ids[i])
            return Component(key, classes[i], unpack_mask(self.packed_masks[i], shapes[i]), along[i], across[i],
                             per_along[i], per_across[i], pixels[i], areas[i], self.max_probability[i],
                             bytes(self.packed_masks[i]))

        return component

    def frame_numbers(self) -> np.ndarray:
        """A number per component naming its frame; the rows of one frame are adjacent (the store sorts them)."""
        cameras = np.asarray(self.camera_ids, dtype=object)
        frames = np.asarray(self.frame_ids, dtype=object)  # ids up to 2**64 - 1
        starts = np.ones(len(self), bool)
        starts[1:] = (cameras[1:] != cameras[:-1]) | (frames[1:] != frames[:-1])
        return np.cumsum(starts)


def _check_mask_sizes(masks: Sequence[bytes], shapes: np.ndarray) -> None:
    """:func:`coils.records.check_packed` of every packed mask; its ValueError for the first wrong one, naming the
    component."""
    for i, (bits, (rows, columns)) in enumerate(zip(masks, shapes.tolist())):
        try:
            check_packed(bits, rows, columns)
        except ValueError as exc:
            raise ValueError(f"component {i}: {exc}") from None


def merged_records(columns: ComponentColumns, gap_mm: float) -> list[DefectRecord]:
    """The coil's defect records: what :meth:`RecordBuilder.records` gives for the same components and gap."""
    count = len(columns)
    along_end = columns.along_start_mm + columns.mask_shapes[:, 0] * columns.mm_per_px_along
    across_end = columns.across_start_mm + columns.mask_shapes[:, 1] * columns.mm_per_px_across
    frames = columns.frame_numbers()
    sets = UnionFind(count)
    made: dict[int, Component] = {}
    component = columns.components()

    def part(i: int) -> Component:
        if i not in made:
            made[i] = component(i)
        return made[i]

    for class_id in np.unique(columns.class_ids):
        members = np.flatnonzero(columns.class_ids == class_id)
        i, j = candidate_pairs(columns.along_start_mm[members], along_end[members], columns.across_start_mm[members],
                               across_end[members], frames[members], gap_mm)
        for a, b in zip(members[i].tolist(), members[j].tolist()):
            if sets.find(a) != sets.find(b) and pixels_touch(part(a), part(b), gap_mm):
                sets.union(a, b)
    alone = (np.asarray(sets.parent) == np.arange(count)) & (np.asarray(sets.size) == 1)
    single = _single_records(columns, np.flatnonzero(alone), along_end, across_end)
    groups: dict[int, list[Component]] = defaultdict(list)
    for i in np.flatnonzero(~alone).tolist():
        groups[sets.find(i)].append(part(i))
    merged = [record_of(parts) for parts in groups.values()]
    # RecordBuilder.records' order: along start, across start, class, along end.
    keys = np.array([(r.along_start_mm, r.across_start_mm, r.class_id, r.along_end_mm) for r in merged],
                    np.float64).reshape(-1, 4)
    order = np.lexsort((np.concatenate([along_end[alone], keys[:, 3]]),
                        np.concatenate([columns.class_ids[alone], keys[:, 2]]),
                        np.concatenate([columns.across_start_mm[alone], keys[:, 1]]),
                        np.concatenate([columns.along_start_mm[alone], keys[:, 0]])))
    found = single + merged
    return [found[i] for i in order.tolist()]


def _single_records(columns: ComponentColumns, single: np.ndarray, along_end: np.ndarray,
                    across_end: np.ndarray) -> list[DefectRecord]:
    """The records of components that touch no other: each one's own box, area and frame."""
    coil = columns.coil_id
    cameras, frames, peaks = columns.camera_ids, columns.frame_ids, columns.max_probability
    classes = columns.class_ids[single].tolist()
    along0, along1 = columns.along_start_mm[single].tolist(), along_end[single].tolist()
    across0, across1 = columns.across_start_mm[single].tolist(), across_end[single].tolist()
    areas = columns.area_mm2[single].tolist()
    return [DefectRecord(coil, classes[n], along0[n], along1[n], across0[n], across1[n], areas[n], peaks[i],
                         ((cameras[i], frames[i]),), (cameras[i],)) for n, i in enumerate(single.tolist())]


__all__ = ["ComponentColumns", "merged_records"]
