"""The line's geometry: the one owner of ``line.yaml`` (:class:`Line`, :func:`load_line`).

Where each camera looks on the strip, how large its pixels are, which image axis runs along the
strip, the strip's nominal width, and the rolls that can print marks. ``server serve --line`` loads
it (``GetLine`` returns it), ``trainer synth-line`` writes it, and :mod:`coils.records` maps mask
pixels to coil coordinates with it. Example::

    name: finishing-line-2
    strip_width_mm: 1580
    cameras:
      - camera_id: top-0
        lane_start_mm: 0          # across position of the lane's first pixel (its operator-side edge)
        mm_per_px_across: 0.5
        mm_per_px_along: 0.5
        along_axis: y             # image rows follow the strip (x: columns do)
        frame_width_px: 1600
        frame_height_px: 256
    rolls:
      - name: work-roll-top
        diameter_mm: 600

Coordinates: a frame's pixel ``(i along, j across)`` covers ``position_mm + [i, i+1) * mm_per_px_along``
along and ``lane_start_mm + [j, j+1) * mm_per_px_across`` across; across pixel indices grow away from
the operator side. Loading checks every value and names the key and the camera of what is wrong;
unknown keys are errors, never ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.files import atomic_write

ALONG_AXES = ("x", "y")


class LineError(ValueError):
    """A line description that cannot be used; the message names the file, the key and the camera."""


@dataclass(frozen=True)
class CameraGeometry:
    """Where one camera looks: its lane across the strip and the size of its pixels.

    Attributes:
        camera_id: the id its frames carry.
        lane_start_mm: across position (mm from the operator-side edge) of its first across pixel's edge.
        mm_per_px_across, mm_per_px_along: one pixel's size.
        along_axis: the image axis that runs along the strip: ``"y"`` (rows) or ``"x"`` (columns).
        frame_width_px, frame_height_px: the frame's size as the camera sends it.
    """

    camera_id: str
    lane_start_mm: float
    mm_per_px_across: float
    mm_per_px_along: float
    along_axis: str
    frame_width_px: int
    frame_height_px: int

    @property
    def pixels_across(self) -> int:
        return self.frame_width_px if self.along_axis == "y" else self.frame_height_px

    @property
    def pixels_along(self) -> int:
        return self.frame_height_px if self.along_axis == "y" else self.frame_width_px

    @property
    def lane_end_mm(self) -> float:
        return self.lane_start_mm + self.pixels_across * self.mm_per_px_across

    @property
    def frame_length_mm(self) -> float:
        """How much strip one frame covers along (the encoder step of a camera whose frames tile)."""
        return self.pixels_along * self.mm_per_px_along


@dataclass(frozen=True)
class Roll:
    """A roll of the line that can print a mark on the strip once per turn."""

    name: str
    diameter_mm: float

    @property
    def circumference_mm(self) -> float:
        """The period along the strip at which its marks repeat."""
        return math.pi * self.diameter_mm


@dataclass(frozen=True)
class Line:
    """A line description: the strip's width, the cameras (in file order) and the rolls."""

    name: str
    strip_width_mm: float
    cameras: tuple[CameraGeometry, ...]
    rolls: tuple[Roll, ...] = ()

    def camera(self, camera_id: str) -> CameraGeometry:
        """The geometry of ``camera_id``; KeyError naming the known ids when the line has no such camera."""
        for camera in self.cameras:
            if camera.camera_id == camera_id:
                return camera
        raise KeyError(f"camera {camera_id!r} is not in line {self.name!r} "
                       f"(cameras: {', '.join(c.camera_id for c in self.cameras)})")

    def owned_across(self, camera_id: str) -> tuple[float, float]:
        """The across range whose pixels count towards areas for ``camera_id``.

        Neighbouring lanes that overlap split the overlap at its middle, so a defect seen by both
        cameras there is counted once; without overlap a camera owns its whole lane.
        """
        lanes = sorted(self.cameras, key=lambda c: c.lane_start_mm)
        i = next(k for k, c in enumerate(lanes) if c.camera_id == camera_id)
        lo, hi = lanes[i].lane_start_mm, lanes[i].lane_end_mm
        if i > 0 and lanes[i - 1].lane_end_mm > lo:
            lo = (lo + lanes[i - 1].lane_end_mm) / 2
        if i + 1 < len(lanes) and lanes[i + 1].lane_start_mm < hi:
            hi = (hi + lanes[i + 1].lane_start_mm) / 2
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        """The ``line.yaml`` content (what :meth:`from_dict` reads)."""
        return {
            "name": self.name,
            "strip_width_mm": self.strip_width_mm,
            "cameras": [{key: getattr(c, key) for key in CAMERA_KEYS} for c in self.cameras],
            "rolls": [{"name": r.name, "diameter_mm": r.diameter_mm} for r in self.rolls],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "line") -> Line:
        """A validated line from ``line.yaml``'s content.

        Raises:
            LineError: naming ``source``, the key and the camera of every problem found first.
        """
        if not isinstance(data, dict):
            raise LineError(f"{source}: expected a mapping with {', '.join(LINE_KEYS)}, got {type(data).__name__}")
        _check_keys(data, LINE_KEYS, ("name", "strip_width_mm", "cameras"), source)
        name = data["name"]
        if not isinstance(name, str) or not name:
            raise LineError(f"{source}: name must be a non-empty string, got {name!r}")
        width = _positive(data["strip_width_mm"], f"{source}: strip_width_mm")
        cameras = data["cameras"]
        if not isinstance(cameras, list) or not cameras:
            raise LineError(f"{source}: cameras must be a non-empty list, got {cameras!r}")
        parsed = tuple(_camera(entry, f"{source}: cameras[{i}]") for i, entry in enumerate(cameras))
        _check_lanes(parsed, width, source)
        rolls = data.get("rolls") or []
        if not isinstance(rolls, list):
            raise LineError(f"{source}: rolls must be a list, got {rolls!r}")
        return cls(name, width, parsed, tuple(_roll(entry, f"{source}: rolls[{i}]") for i, entry in enumerate(rolls)))


LINE_KEYS = ("name", "strip_width_mm", "cameras", "rolls")
CAMERA_KEYS = ("camera_id", "lane_start_mm", "mm_per_px_across", "mm_per_px_along", "along_axis",
               "frame_width_px", "frame_height_px")
ROLL_KEYS = ("name", "diameter_mm")


def _check_keys(data: dict, allowed: tuple[str, ...], required: tuple[str, ...], where: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise LineError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})")
    missing = [k for k in required if k not in data]
    if missing:
        raise LineError(f"{where}: missing key(s) {', '.join(missing)}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LineError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _positive(value: Any, where: str) -> float:
    number = _number(value, where)
    if number <= 0:
        raise LineError(f"{where} must be a positive number, got {value!r}")
    return number


def _camera(entry: Any, where: str) -> CameraGeometry:
    if not isinstance(entry, dict):
        raise LineError(f"{where}: expected a mapping with {', '.join(CAMERA_KEYS)}, got {entry!r}")
    camera_id = entry.get("camera_id")
    if not isinstance(camera_id, str) or not camera_id:
        raise LineError(f"{where}: camera_id must be a non-empty string, got {camera_id!r}")
    where = f"{where} (camera {camera_id!r})"
    _check_keys(entry, CAMERA_KEYS, CAMERA_KEYS, where)
    if entry["along_axis"] not in ALONG_AXES:
        raise LineError(f"{where}: along_axis must be 'x' or 'y', got {entry['along_axis']!r}")
    sizes = {}
    for key in ("frame_width_px", "frame_height_px"):
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LineError(f"{where}: {key} must be a whole number of pixels >= 1, got {value!r}")
        sizes[key] = value
    return CameraGeometry(
        camera_id=camera_id,
        lane_start_mm=_number(entry["lane_start_mm"], f"{where}: lane_start_mm"),
        mm_per_px_across=_positive(entry["mm_per_px_across"], f"{where}: mm_per_px_across"),
        mm_per_px_along=_positive(entry["mm_per_px_along"], f"{where}: mm_per_px_along"),
        along_axis=entry["along_axis"], **sizes,
    )


def _check_lanes(cameras: tuple[CameraGeometry, ...], strip_width_mm: float, source: str) -> None:
    """Unique ids, every lane on the strip, no lane inside another (the overlap split needs it)."""
    seen: set[str] = set()
    for camera in cameras:
        if camera.camera_id in seen:
            raise LineError(f"{source}: cameras: camera id {camera.camera_id!r} is listed twice")
        seen.add(camera.camera_id)
        # A lane may reach past the strip's edge (edge cameras look at the line bed too), not lie beside it.
        if camera.lane_end_mm <= 0 or camera.lane_start_mm >= strip_width_mm:
            raise LineError(f"{source}: camera {camera.camera_id!r}: its lane {camera.lane_start_mm:g}.."
                            f"{camera.lane_end_mm:g} mm lies outside the strip (0..{strip_width_mm:g} mm)")
    lanes = sorted(cameras, key=lambda c: c.lane_start_mm)
    for left, right in zip(lanes, lanes[1:]):
        if right.lane_end_mm <= left.lane_end_mm:
            raise LineError(f"{source}: camera {right.camera_id!r}: its lane lies inside camera "
                            f"{left.camera_id!r}'s; neighbouring lanes may only overlap at their edges")


def _roll(entry: Any, where: str) -> Roll:
    if not isinstance(entry, dict):
        raise LineError(f"{where}: expected a mapping with {', '.join(ROLL_KEYS)}, got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise LineError(f"{where}: name must be a non-empty string, got {name!r}")
    where = f"{where} (roll {name!r})"
    _check_keys(entry, ROLL_KEYS, ROLL_KEYS, where)
    return Roll(name, _positive(entry["diameter_mm"], f"{where}: diameter_mm"))


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key given twice in one mapping (it would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for key in keys:
            if keys.count(key) > 1:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_line(path: str | Path) -> Line:
    """Reads and validates a ``line.yaml``.

    Raises:
        FileNotFoundError: no such file.
        LineError: not YAML, or a value that is wrong (the message names the file, key and camera).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such line description file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 - safe
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LineError(f"{path}: not a YAML file: {exc}") from None
    return Line.from_dict(data, source=str(path))


def write_line(path: str | Path, line: Line) -> Path:
    """Writes ``line`` as a ``line.yaml`` that :func:`load_line` reads back equal."""
    return atomic_write(path, yaml.safe_dump(line.to_dict(), sort_keys=False), make_parents=True)


__all__ = ["ALONG_AXES", "CameraGeometry", "Line", "LineError", "Roll", "load_line", "write_line"]
