"""Defect records: one physical defect is one record, in coil coordinates (:class:`RecordBuilder`).

Per frame and class, the predicted mask's connected components (8-connectivity, :mod:`coils.labelling`:
a compiled run-based labelling, or OpenCV's where numba is missing) are mapped into coil coordinates with the line's
geometry (:mod:`coils.line`): millimetres along from the coil's head, across from the operator-side
edge. Components of different frames of one coil and class whose pixels touch (within
``gap_mm``) are the same defect: a scratch running over a frame boundary, a stain seen by two
cameras in their lanes' overlap, or both at once. Merging is union-find over components:

* incremental: a frame's components are joined to what is already there as the frame arrives
  (candidates come from an index of the boxes, :class:`coils.merge.BoxIndex`), nothing is recomputed;
* order-independent: the sets union-find ends with depend on which pairs touch, not on the order
  the frames came in, so cameras may deliver frames in any interleaving;
* near-linear: union by size with path halving costs an inverse-Ackermann factor per operation.

"Touch" is decided on the pixels, not the boxes (:mod:`coils.merge`): both components are
rasterised on a grid of the finer pixel size over the window where their boxes meet, one is
dilated by the tolerance, and the two must share a cell. At ``gap_mm`` of half a pixel this is
exactly 8-connectivity across the frame boundary or lane edge, as if the frames were one image;
two defects one clean pixel apart stay two records.

Stored components come back without labelling again: :meth:`RecordBuilder.add_components` takes a
frame's components as they were made, and :func:`coils.columns.merged_records` merges a whole
coil's from a store's columns at close (same rule, same records, faster). Components and records
serialise to JSON (``to_dict``/``from_dict``); a box mask is stored as bits (:func:`pack_mask`).

A record's area counts each pixel once: where two lanes overlap, each camera counts only the
pixels on its side of the overlap's middle (:meth:`coils.line.Line.owned_across`). Frames of one
camera are assumed to tile along the strip (encoder step = frame length); overlapping frames would
count their shared rows twice in the area (extents stay exact).
"""

from __future__ import annotations

import base64
import math
import operator
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from coils.labelling import label
from coils.line import CameraGeometry, Line
from coils.merge import EPSILON_MM, Boxes, BoxIndex, UnionFind, boxes_meet, pixels_touch


@dataclass(frozen=True)
class FrameKey:
    """Which frame a component came from: adding a frame with a key already seen changes nothing."""

    coil_id: str
    camera_id: str
    frame_id: int


@dataclass(frozen=True)
class Component:
    """One connected component of one class in one frame, in coil coordinates.

    Attributes:
        mask: bool ``[along, across]``, the component's pixels within its box (other components' cleared).
        along_start_mm, across_start_mm: the box's first pixel's edge.
        mm_per_px_along, mm_per_px_across: the frame's pixel size.
        pixel_count: every pixel of the component.
        area_mm2: its pixels on its camera's side of a lane overlap, in mm².
        max_probability: the class probability's maximum inside it; None when not given.
        mask_bits: ``pack_mask(mask)``, packed once where the component is made (see :meth:`packed_mask`).
    """

    key: FrameKey
    class_id: int
    mask: np.ndarray
    along_start_mm: float
    across_start_mm: float
    mm_per_px_along: float
    mm_per_px_across: float
    pixel_count: int
    area_mm2: float
    max_probability: float | None
    mask_bits: bytes | None = field(default=None, compare=False, repr=False)

    def packed_mask(self) -> bytes:
        """The box mask as :func:`pack_mask` packs it (what the store and the spool keep)."""
        return self.mask_bits if self.mask_bits is not None else pack_mask(self.mask)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as plain values with the packed mask (no array object, an eighth of the bytes); a call's
        components go to the line watch's process as columns instead (:mod:`server.watch_wire`)."""
        return _unpickle_component, (self.key, self.class_id, self.packed_mask(), *self.box_shape,
                                     self.along_start_mm, self.across_start_mm, self.mm_per_px_along,
                                     self.mm_per_px_across, self.pixel_count, self.area_mm2, self.max_probability)

    def __getattr__(self, name: str) -> Any:
        """Only for attributes not set: the mask of a component made packed (:func:`packed_component`, unpickled),
        unpacked when first read (the line watch reads the masks of the few whose boxes meet another frame's)."""
        shape = self.__dict__.get("_box_shape") if name == "mask" else None
        if shape is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        mask = unpack_mask(self.mask_bits, shape)
        object.__setattr__(self, "mask", mask)
        return mask

    @property
    def box_shape(self) -> tuple[int, int]:
        """The box in pixels (rows along, columns across), without unpacking a packed mask."""
        shape = self.__dict__.get("_box_shape")
        return shape if shape is not None else self.mask.shape

    @property
    def along_end_mm(self) -> float:
        return self.along_start_mm + self.box_shape[0] * self.mm_per_px_along

    @property
    def across_end_mm(self) -> float:
        return self.across_start_mm + self.box_shape[1] * self.mm_per_px_across

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the key's fields, the box mask as base64 of :func:`pack_mask` and its shape."""
        out = {name: getattr(self, name) for name in _COMPONENT_SCALARS}
        out.update(coil_id=self.key.coil_id, camera_id=self.key.camera_id, frame_id=self.key.frame_id,
                   mask=base64.b64encode(self.packed_mask()).decode("ascii"), mask_shape=list(self.box_shape))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Component:
        """What :meth:`to_dict` wrote; KeyError naming a missing or unknown key."""
        _check_keys("component", data, (*_COMPONENT_SCALARS, "coil_id", "camera_id", "frame_id", "mask",
                                        "mask_shape"))
        bits = base64.b64decode(data["mask"])
        mask = unpack_mask(bits, tuple(data["mask_shape"]))
        probability = data["max_probability"]
        return cls(FrameKey(data["coil_id"], data["camera_id"], int(data["frame_id"])), int(data["class_id"]), mask,
                   float(data["along_start_mm"]), float(data["across_start_mm"]), float(data["mm_per_px_along"]),
                   float(data["mm_per_px_across"]), int(data["pixel_count"]), float(data["area_mm2"]),
                   None if probability is None else float(probability), bits)


def _unpickle_component(key: FrameKey, class_id: int, bits: bytes, rows: int, columns: int, *scalars: Any) -> Component:
    """A pickled component, its mask left packed until read (``Component.__getattr__``)."""
    check_packed(bits, rows, columns)
    return packed_component(key, class_id, bits, rows, columns, *scalars)


def packed_component(key: FrameKey, class_id: int, bits: bytes, rows: int, columns: int, along: float, across: float,
                     per_px_along: float, per_px_across: float, pixels: int, area: float,
                     peak: float | None) -> Component:
    """A component whose ``rows`` x ``columns`` mask stays packed (``bits``, not checked: the caller did) until
    read (``Component.__getattr__``): how the line watch's process takes the components it is sent."""
    component = object.__new__(Component)
    fields = component.__dict__  # set one by one: a third of the time of a dict built from names (per component)
    fields["key"], fields["class_id"], fields["mask_bits"], fields["_box_shape"] = key, class_id, bits, (rows, columns)
    fields["along_start_mm"], fields["across_start_mm"] = along, across
    fields["mm_per_px_along"], fields["mm_per_px_across"] = per_px_along, per_px_across
    fields["pixel_count"], fields["area_mm2"], fields["max_probability"] = pixels, area, peak
    return component


_COMPONENT_SCALARS = ("class_id", "along_start_mm", "across_start_mm", "mm_per_px_along", "mm_per_px_across",
                      "pixel_count", "area_mm2", "max_probability")


def pack_mask(mask: np.ndarray) -> bytes:
    """A bool box mask as bits (``np.packbits``, row-major): 1/8 of its pixels in bytes; the shape goes beside it."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=None).tobytes()


def check_packed(data: bytes, rows: int, cols: int) -> None:
    """ValueError when ``data`` is not the size :func:`pack_mask` gives a ``rows`` x ``cols`` mask."""
    if len(data) != (rows * cols + 7) // 8:
        raise ValueError(f"a packed {rows}x{cols} mask has {(rows * cols + 7) // 8} bytes, got {len(data)}")


def unpack_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """The bool ``shape`` mask :func:`pack_mask` packed; ValueError when the bytes do not fit the shape."""
    rows, cols = int(shape[0]), int(shape[1])
    check_packed(data, rows, cols)
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=rows * cols)
    return bits.view(bool).reshape(rows, cols)


def _check_keys(what: str, data: dict[str, Any], expected: Sequence[str]) -> None:
    if not isinstance(data, dict):
        raise TypeError(f"{what}: expected a mapping, got {type(data).__name__}")
    missing = [k for k in expected if k not in data]
    unknown = [k for k in data if k not in expected]
    if missing or unknown:
        raise KeyError(f"{what}: missing keys {missing}, unknown keys {unknown}")


@dataclass(frozen=True)
class DefectRecord:
    """One physical defect on a coil, merged from every frame and lane it touches.

    Attributes:
        along_start_mm, along_end_mm: its extent along the strip, mm from the coil's head.
        across_start_mm, across_end_mm: its extent across, mm from the operator-side edge.
        area_mm2: its area, each pixel counted once.
        max_probability: the largest class probability inside it; None when no frame gave any.
        frames: ``(camera_id, frame_id)`` of every frame it was seen in, sorted.
        cameras: the cameras that saw it, sorted.
    """

    coil_id: str
    class_id: int
    along_start_mm: float
    along_end_mm: float
    across_start_mm: float
    across_end_mm: float
    area_mm2: float
    max_probability: float | None
    frames: tuple[tuple[str, int], ...]
    cameras: tuple[str, ...]

    @property
    def length_mm(self) -> float:
        return self.along_end_mm - self.along_start_mm

    @property
    def width_mm(self) -> float:
        return self.across_end_mm - self.across_start_mm

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field; frames as ``[camera_id, frame_id]`` pairs."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["frames"] = [list(frame) for frame in self.frames]
        out["cameras"] = list(self.cameras)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DefectRecord:
        """What :meth:`to_dict` wrote; KeyError naming a missing or unknown key."""
        _check_keys("defect record", data, [f.name for f in fields(cls)])
        probability = data["max_probability"]
        return cls(
            coil_id=str(data["coil_id"]), class_id=int(data["class_id"]),
            along_start_mm=float(data["along_start_mm"]), along_end_mm=float(data["along_end_mm"]),
            across_start_mm=float(data["across_start_mm"]), across_end_mm=float(data["across_end_mm"]),
            area_mm2=float(data["area_mm2"]), max_probability=None if probability is None else float(probability),
            frames=tuple((str(camera), int(frame)) for camera, frame in data["frames"]),
            cameras=tuple(str(camera) for camera in data["cameras"]))


def to_along_across(mask: np.ndarray, camera: CameraGeometry) -> np.ndarray:
    """A frame-shaped ``[H, W]`` array as ``[along, across]`` for ``camera`` (a view, no copy)."""
    if mask.shape != (camera.frame_height_px, camera.frame_width_px):
        raise ValueError(f"camera {camera.camera_id!r}: frame {mask.shape[0]}x{mask.shape[1]} is not the line's "
                         f"{camera.frame_height_px}x{camera.frame_width_px} (height x width)")
    return mask if camera.along_axis == "y" else mask.T


def frame_components(key: FrameKey, class_id: int, mask: np.ndarray, position_mm: float, camera: CameraGeometry,
                     owned_across: tuple[float, float], probability: np.ndarray | None = None) -> list[Component]:
    """The connected components (8-connectivity) of one class's ``[H, W]`` mask in coil coordinates.

    Args:
        position_mm: the encoder reading of the frame's first along pixel.
        owned_across: the across range whose pixels count towards areas (:meth:`Line.owned_across`).
        probability: the class probability ``[H, W]``, for each component's maximum; None if not known.
    """
    grid = to_along_across(np.asarray(mask), camera)
    probs = None if probability is None else to_along_across(np.asarray(probability, np.float32), camera)
    pa, px = camera.mm_per_px_along, camera.mm_per_px_across
    centres = camera.lane_start_mm + (np.arange(grid.shape[1]) + 0.5) * px
    owned = (centres >= owned_across[0]) & (centres < owned_across[1])
    found = label(grid, owned, probs)
    peaks = [None] * len(found.crops) if found.peaks is None else found.peaks.tolist()
    packed = [pack_mask(crop) for crop in found.crops] if found.packed is None else found.packed
    return [Component(key, class_id, crop, position_mm + top * pa, camera.lane_start_mm + left * px, pa, px, pixels,
                      owned_pixels * pa * px, peak, bits)
            for (top, left, _, _, pixels, owned_pixels), crop, peak, bits in zip(found.stats.tolist(), found.crops,
                                                                                 peaks, packed)]


def masks_components(line: Line, key: FrameKey, position_mm: float, masks: np.ndarray,
                     probabilities: np.ndarray | None = None,
                     owned_across: tuple[float, float] | None = None) -> list[Component]:
    """Every class's components of one frame's masks ``[C, H, W]`` (class ``k`` at index ``k - 1``).

    Args:
        probabilities: ``[C, H, W]`` class probabilities, or None.
        owned_across: ``line.owned_across(key.camera_id)``, when the caller keeps it.

    Raises:
        KeyError: the line has no such camera.
        ValueError: the masks' frame size is not the camera's.
    """
    camera = line.camera(key.camera_id)
    owned = line.owned_across(key.camera_id) if owned_across is None else owned_across
    found: list[Component] = []
    for k in range(len(masks)):
        probability = None if probabilities is None else probabilities[k]
        found += frame_components(key, k + 1, masks[k], float(position_mm), camera, owned, probability)
    return found


def default_gap_mm(line: Line) -> float:
    """Half the line's smallest pixel: components this close are one defect (8-connectivity over boundaries)."""
    return min(min(c.mm_per_px_along, c.mm_per_px_across) for c in line.cameras) / 2


class RecordBuilder:
    """Defect records of the coils of one line, built frame by frame in any order.

    Example::

        builder = RecordBuilder(load_line("line.yaml"))
        builder.add_frame("C123", "top-0", frame_id=41, position_mm=10496.0, masks=masks)  # [C, H, W]
        records = builder.records("C123")

    Args:
        line: the line's geometry.
        gap_mm: components of different frames whose pixels lie at most this far apart are one
            defect; default half the smallest pixel of the line (8-connectivity, robust to encoder
            jitter below half a pixel).
    """

    def __init__(self, line: Line, gap_mm: float | None = None) -> None:
        self.line = line
        self.gap_mm = default_gap_mm(line) if gap_mm is None else float(gap_mm)
        if not (math.isfinite(self.gap_mm) and self.gap_mm >= 0):
            raise ValueError(f"gap_mm must be a finite number >= 0, got {gap_mm}")
        self._owned = {c.camera_id: line.owned_across(c.camera_id) for c in line.cameras}
        self._components: list[Component] = []
        self._sets = UnionFind()
        self._frames: set[FrameKey] = set()
        self._boxes: dict[str, BoxIndex] = {}  # per coil: the merge candidates' index
        # records() kept incrementally: per coil, root -> its record, and the components added or merged
        # away since the last call (their roots' records are made again; every other record is kept)
        self._members: dict[int, list[int]] = {}  # root -> its components, for sets of more than one
        self._records: dict[str, dict[int, DefectRecord]] = defaultdict(dict)
        self._changed: dict[str, set[int]] = defaultdict(set)

    @property
    def frames_added(self) -> int:
        return len(self._frames)

    def add_frame(self, coil_id: str, camera_id: str, frame_id: int, position_mm: float, masks: np.ndarray,
                  probabilities: np.ndarray | None = None) -> bool:
        """Adds one frame's masks ``[C, H, W]`` (class ``k`` at index ``k - 1``) and merges its components.

        Args:
            position_mm: the encoder reading of the frame's first along pixel.
            probabilities: ``[C, H, W]`` class probabilities, or None.

        Returns:
            False when this (coil, camera, frame id) was added before: nothing changes (a resent frame).

        Raises:
            KeyError: the line has no such camera.
            ValueError: the masks' frame size is not the camera's.
        """
        key = FrameKey(coil_id, camera_id, int(frame_id))
        if key in self._frames:
            return False
        self.line.camera(camera_id)  # KeyError naming the line's cameras
        return self.add_components(key, masks_components(self.line, key, position_mm, masks, probabilities,
                                                         self._owned[camera_id]))

    def add_components(self, key: FrameKey, components: Iterable[Component]) -> bool:
        """Adds one frame's components as :func:`frame_components` made them (stored ones, read back).

        No connected components are computed again: a store keeps each frame's components and
        rebuilds a coil's records from them. An empty ``components`` still counts the frame.

        Returns:
            False when ``key`` was added before: nothing changes.

        Raises:
            ValueError: a component belongs to another frame.
        """
        return self.add_frames([(key, components)])[0]

    def add_frames(self, frames: Iterable[tuple[FrameKey, Iterable[Component]]]) -> list[bool]:
        """:meth:`add_components` for many frames at once, the same records: their merge candidates are found
        together, in numpy (:class:`coils.merge.BoxIndex`), where one frame at a time pays numpy's call costs
        per frame. The line watch adds each call's frames so.

        Returns:
            Per frame, False when its key was added before (or earlier in ``frames``): nothing changes for it.
        """
        added: list[bool] = []
        taken: dict[str, list[tuple[int, list[Component]]]] = defaultdict(list)
        try:
            for key, components in frames:
                added.append(key not in self._frames)
                if added[-1]:
                    found = self._take(key, components)
                    if found:
                        taken[key.coil_id].append((len(self._frames), found))
        finally:  # a refused frame (ValueError) leaves the frames before it added
            for coil_id, parts in taken.items():
                self._merge(coil_id, parts)
        return added

    def _take(self, key: FrameKey, components: Iterable[Component]) -> list[Component]:
        """``components`` of the new frame ``key``, checked; the frame counts as added."""
        found = list(components)
        for component in found:
            if component.key is not key and component.key != key:
                raise ValueError(f"a component of frame {component.key} given for frame {key}")
        self._frames.add(key)
        return found

    def _merge(self, coil_id: str, parts: list[tuple[int, list[Component]]]) -> None:
        """Numbers the new frames' components (``(frame number, components)`` of one coil) and joins every pair
        of different frames whose pixels touch, earlier components or new."""
        new = [c for _, found in parts for c in found]
        numbers = self._sets.add(len(new))  # the components' numbers: their places in self._components
        self._components += new
        self._changed[coil_id].update(numbers)
        index = self._boxes.get(coil_id)
        if index is None:
            index = self._boxes[coil_id] = BoxIndex(self.gap_mm)
        frames = np.repeat([number for number, _ in parts], [len(found) for _, found in parts])
        earlier, later = index.add(Boxes.of(new, frames, numbers.start))
        find, components = self._sets.find, self._components
        for a, b in zip(earlier.tolist(), later.tolist()):
            if find(a) != find(b) and pixels_touch(components[a], components[b], self.gap_mm):
                self._join(a, b, coil_id)

    def _join(self, a: int, b: int, coil_id: str) -> None:
        """Unites the sets of ``a`` and ``b``, their members listed under the new root, both old roots changed."""
        ra, rb = self._sets.find(a), self._sets.find(b)
        self._sets.union(ra, rb)
        root = self._sets.find(ra)
        kept, gone = (ra, rb) if root == ra else (rb, ra)
        members = self._members.setdefault(kept, [kept])
        members += self._members.pop(gone, [gone])
        self._changed[coil_id].update((ra, rb))

    def coils(self) -> list[str]:
        """The coils with at least one frame added, sorted."""
        return sorted({key.coil_id for key in self._frames})

    def records(self, coil_id: str) -> list[DefectRecord]:
        """The coil's defect records as they stand, sorted by along start, across start and class.

        Only the records of the sets that grew or merged since the last call are made again: a
        coil's records are there for a live view, asked for again and again as its frames come.
        """
        kept, changed = self._records[coil_id], self._changed.pop(coil_id, set())
        for number in changed:
            kept.pop(number, None)
        find, components, members = self._sets.find, self._components, self._members
        for root in {find(number) for number in changed}:
            group = members.get(root)  # None: a component alone
            kept[root] = _single_record(components[root]) if group is None else record_of(
                [components[m] for m in sorted(group)])
        return sorted(kept.values(), key=_RECORD_ORDER)


#: The order of :meth:`RecordBuilder.records`: along start, across start, class, along end.
_RECORD_ORDER = operator.attrgetter("along_start_mm", "across_start_mm", "class_id", "along_end_mm")


def _single_record(part: Component) -> DefectRecord:
    """The record of a component that touches no other: its own box, area and frame. Its fields set one by one
    (as a frozen dataclass' ``__init__`` would, half the time): a dense coil's live view makes tens of thousands."""
    key, (rows, columns) = part.key, part.box_shape
    record = object.__new__(DefectRecord)
    values = record.__dict__
    values["coil_id"], values["class_id"] = key.coil_id, part.class_id
    values["along_start_mm"] = part.along_start_mm
    values["along_end_mm"] = part.along_start_mm + rows * part.mm_per_px_along  # Component.along_end_mm's sum
    values["across_start_mm"] = part.across_start_mm
    values["across_end_mm"] = part.across_start_mm + columns * part.mm_per_px_across
    values["area_mm2"], values["max_probability"] = part.area_mm2, part.max_probability
    values["frames"], values["cameras"] = ((key.camera_id, key.frame_id),), (key.camera_id,)
    return record


def record_of(parts: Sequence[Component]) -> DefectRecord:
    """The record of one set of touching components: their joint box, summed area, largest probability."""
    if len(parts) == 1:  # most records: one component in one frame
        return _single_record(parts[0])
    peaks = [p.max_probability for p in parts if p.max_probability is not None]
    first = parts[0]
    return DefectRecord(
        coil_id=first.key.coil_id,
        class_id=first.class_id,
        along_start_mm=min(p.along_start_mm for p in parts),
        along_end_mm=max(p.along_end_mm for p in parts),
        across_start_mm=min(p.across_start_mm for p in parts),
        across_end_mm=max(p.across_end_mm for p in parts),
        area_mm2=sum(p.area_mm2 for p in parts),
        max_probability=max(peaks) if peaks else None,
        frames=tuple(sorted({(p.key.camera_id, p.key.frame_id) for p in parts})),
        cameras=tuple(sorted({p.key.camera_id for p in parts})),
    )


__all__ = ["EPSILON_MM", "Component", "DefectRecord", "FrameKey", "RecordBuilder", "boxes_meet",
           "check_packed", "default_gap_mm", "frame_components", "masks_components", "pack_mask", "packed_component",
           "pixels_touch", "record_of", "to_along_across", "unpack_mask"]
