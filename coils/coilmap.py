"""The coil map: one coil drawn as a whole, every defect at its place (:func:`map_svg`, :func:`render_map`).

The strip runs left to right (along, metres from the coil's head) and top to bottom (across, mm
from the operator-side edge). Each axis has its own linear scale with ticks: a coil is a thousand
times longer than it is wide, so one scale for both would draw a line. Drawn:

* the camera lanes as tinted bands over the whole length (where two lanes overlap the tints add up,
  so the overlap shows darker), each labelled with its camera id;
* each defect record a mark in its class's colour (:func:`engine.overlay.class_colour`, the one the
  console and the frame drawings use): a rectangle over its along x across extent, at least
  ``MIN_MARK_PX`` on a side; an elongated one (one extent ``LONG_RATIO`` times the other or more) a
  line along its long side;
* per class a density strip under the map: defects per metre in bins along the length (a record
  counts in the bin of its along centre);
* a legend with each class's name and count, and a title with the coil id, its state, length,
  frames and defects per class and per 100 m (no grade: grading is the mill's rule, not the map's).

The drawing is made once as a list of shapes (:class:`Shape`) and written either as SVG (each
defect an element with ``data-*`` attributes: record index, class, extents, so a page can make it
clickable) or rasterised with OpenCV to PNG (OpenCV is a core dependency: the serving install has it,
while matplotlib and cairo come with no serving extra). Output is deterministic: the same coil gives
the same bytes.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import cv2
import numpy as np

from coils.line import Line
from coils.records import DefectRecord
from engine.files import atomic_write
from engine.metadata import default_class_names
from engine.overlay import class_colour_hex

if TYPE_CHECKING:
    from coils.alarms import Alarm
    from coils.periodic import PeriodicDefect
    from coils.summary import CoilSummary

#: Canvas width and the strip's drawn height, pixels.
WIDTH_PX, STRIP_PX = 1200, 260
#: Margins of the strip's box inside the canvas: left (across ticks, class labels), right, top (title).
LEFT_PX, RIGHT_PX, TOP_PX = 96, 24, 64
#: Height of one class's density strip, and the gap above the first one (along ticks live there).
DENSITY_PX, DENSITY_GAP_PX = 26, 40
#: Smallest side of a defect's mark, and the narrowest line, pixels: a 1 mm pit on a 1 km coil stays visible.
MIN_MARK_PX, MIN_LINE_PX = 5, 3
#: A defect whose one extent is at least this many times the other is drawn as a line.
LONG_RATIO = 4.0
#: Most bins of a density strip.
MAX_BINS = 60
SUFFIXES = (".png", ".svg")
_STRIP_FILL, _AXIS, _TEXT, _MUTED = "#e5e7eb", "#6b7280", "#111827", "#4b5563"
_LANE_TINTS = ("#60a5fa", "#a78bfa")
_FONT = "system-ui, sans-serif"
_PERIODIC = "#dc2626"  # the lines linking a periodic defect's repeats
_ALARM = "#f97316"  # alarm positions


@dataclass(frozen=True)
class Shape:
    """One element of the drawing, in canvas pixels.

    Attributes:
        kind: ``rect`` (x, y, w, h), ``line`` (x, y to x2, y2, ``width`` thick) or ``text`` (at x, y;
            ``anchor`` start/middle/end, ``size`` px).
        fill, stroke: ``#rrggbb`` or "" for none; ``opacity`` applies to the fill.
        attrs: extra SVG attributes (``class``, ``data-*``), in order.
    """

    kind: str
    x: float
    y: float
    w: float = 0.0
    h: float = 0.0
    x2: float = 0.0
    y2: float = 0.0
    fill: str = ""
    stroke: str = ""
    width: float = 1.0
    opacity: float = 1.0
    text: str = ""
    size: float = 12.0
    anchor: str = "start"
    attrs: tuple[tuple[str, str], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class MapScale:
    """Millimetres to canvas pixels: along -> x over ``[0, length_mm]``, across -> y over ``[across0, across1]``."""

    length_mm: float
    across0_mm: float
    across1_mm: float

    @property
    def plot_px(self) -> float:
        return WIDTH_PX - LEFT_PX - RIGHT_PX

    def x(self, along_mm: float) -> float:
        return LEFT_PX + along_mm / self.length_mm * self.plot_px

    def y(self, across_mm: float) -> float:
        return TOP_PX + (across_mm - self.across0_mm) / (self.across1_mm - self.across0_mm) * STRIP_PX


def map_scale(line: Line, summary: CoilSummary, records: Sequence[DefectRecord]) -> MapScale:
    """The map's scale: the coil's length (or its furthest defect), the strip and every lane across."""
    length = max([summary.length_mm, 1.0] + [r.along_end_mm for r in records])
    across0 = min([0.0] + [c.lane_start_mm for c in line.cameras] + [r.across_start_mm for r in records])
    across1 = max([line.strip_width_mm] + [c.lane_end_mm for c in line.cameras] + [r.across_end_mm for r in records])
    return MapScale(float(length), float(across0), float(across1))


def nice_step(span: float, most: int) -> float:
    """The smallest 1, 2 or 5 x 10^k step that cuts ``span`` into at most ``most`` parts."""
    raw = span / max(1, most)
    power = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1.0, 2.0, 5.0, 10.0):
        if factor * power >= raw:
            return factor * power
    return 10.0 * power


def _number(value: float) -> str:
    """A coordinate as SVG and the data attributes write it: short, exact to 1/1000."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _text(x: float, y: float, text: str, size: float = 11.0, anchor: str = "start", fill: str = _TEXT,
          attrs: tuple[tuple[str, str], ...] = ()) -> Shape:
    return Shape("text", x, y, text=text, size=size, anchor=anchor, fill=fill, attrs=attrs)


def _class_name(class_names: Sequence[str], class_id: int) -> str:
    return class_names[class_id - 1] if 0 < class_id <= len(class_names) else f"class {class_id}"


def _title(summary: CoilSummary, class_names: Sequence[str], total: int) -> list[Shape]:
    state = summary.state if not summary.close_reason else f"{summary.state} ({summary.close_reason})"
    first = (f"coil {summary.coil_id}: {state}, {summary.length_mm / 1000:.1f} m, {summary.frames} frames, "
             f"{total} defects")
    per_class = [f"{_class_name(class_names, k)} {n} ({summary.per_100m.get(k, 0.0):.1f}/100 m)"
                 for k, n in sorted(summary.defects_per_class.items()) if n]
    second = "per class: " + (", ".join(per_class) if per_class else "none")
    return [_text(LEFT_PX, 22, first, 15, attrs=(("class", "title"),)), _text(LEFT_PX, 42, second, 12, fill=_MUTED)]


def _strip(line: Line, scale: MapScale) -> list[Shape]:
    """The strip's box, the camera lanes as tinted bands (overlaps darker) and their labels."""
    x0, x1 = scale.x(0.0), scale.x(scale.length_mm)
    shapes = [Shape("rect", x0, scale.y(0.0), x1 - x0, scale.y(line.strip_width_mm) - scale.y(0.0), fill=_STRIP_FILL,
                    attrs=(("class", "strip"), ("data-length-mm", _number(scale.length_mm)),
                           ("data-width-mm", _number(line.strip_width_mm))))]
    for k, camera in enumerate(sorted(line.cameras, key=lambda c: c.lane_start_mm)):
        y0, y1 = scale.y(camera.lane_start_mm), scale.y(camera.lane_end_mm)
        shapes.append(Shape("rect", x0, y0, x1 - x0, y1 - y0, fill=_LANE_TINTS[k % 2], opacity=0.16,
                            stroke=_LANE_TINTS[k % 2],
                            attrs=(("class", "lane"), ("data-camera", camera.camera_id),
                                   ("data-across-start-mm", _number(camera.lane_start_mm)),
                                   ("data-across-end-mm", _number(camera.lane_end_mm)))))
        shapes.append(_text(x1 - 4, y0 + 12 + 12 * (k % 2), camera.camera_id, 10, "end", _MUTED))
    return shapes


def _axes(line: Line, scale: MapScale) -> list[Shape]:
    """Along ticks in metres under the strip, across ticks in mm left of it."""
    bottom, shapes = TOP_PX + STRIP_PX, []
    step = nice_step(scale.length_mm, 10)
    for k in range(int(scale.length_mm // step) + 1):
        x = scale.x(k * step)
        shapes.append(Shape("line", x, bottom, x2=x, y2=bottom + 5, stroke=_AXIS))
        shapes.append(_text(x, bottom + 17, f"{k * step / 1000:g}", 10, "middle", _MUTED))
    shapes.append(_text(scale.x(scale.length_mm), bottom + 31, "along (m from the head)", 10, "end", _MUTED))
    step = nice_step(scale.across1_mm - scale.across0_mm, 5)
    first = math.ceil(scale.across0_mm / step)
    for k in range(first, int(scale.across1_mm // step) + 1):
        y = scale.y(k * step)
        shapes.append(Shape("line", LEFT_PX - 5, y, x2=LEFT_PX, y2=y, stroke=_AXIS))
        shapes.append(_text(LEFT_PX - 8, y + 4, f"{k * step:g}", 10, "end", _MUTED))
    shapes.append(_text(8, TOP_PX - 6, "across (mm)", 10, "start", _MUTED))
    return shapes


def is_long(record: DefectRecord) -> bool:
    """Whether the record is drawn as a line: one extent ``LONG_RATIO`` times the other or more."""
    short, long_ = sorted((record.length_mm, record.width_mm))
    return long_ >= LONG_RATIO * max(short, 1e-9)


def _mark(index: int, record: DefectRecord, scale: MapScale, frames_url: str | None) -> Shape:
    """A record's mark: a rectangle over its extent, at least ``MIN_MARK_PX`` a side, or a line."""
    colour = class_colour_hex(record.class_id - 1)
    x0, x1 = scale.x(record.along_start_mm), scale.x(record.along_end_mm)
    y0, y1 = scale.y(record.across_start_mm), scale.y(record.across_end_mm)
    attrs = [("class", "defect"), ("data-record", str(index)), ("data-class", str(record.class_id)),
             ("data-along-start-mm", _number(record.along_start_mm)), ("data-along-end-mm", _number(record.along_end_mm)),
             ("data-across-start-mm", _number(record.across_start_mm)),
             ("data-across-end-mm", _number(record.across_end_mm)), ("data-area-mm2", _number(record.area_mm2))]
    if frames_url is not None:
        attrs.append(("data-frame-url", frames_url.format(record=index, coil_id=quote(record.coil_id, safe=""))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if is_long(record):
        along = record.length_mm >= record.width_mm
        half = max(x1 - x0 if along else y1 - y0, MIN_MARK_PX) / 2
        thick = max(y1 - y0 if along else x1 - x0, MIN_LINE_PX)
        ends = (cx - half, cy, cx + half, cy) if along else (cx, cy - half, cx, cy + half)
        return Shape("line", ends[0], ends[1], x2=ends[2], y2=ends[3], stroke=colour, width=thick,
                     attrs=(("data-shape", "line"), *attrs))
    w, h = max(x1 - x0, MIN_MARK_PX), max(y1 - y0, MIN_MARK_PX)
    return Shape("rect", cx - w / 2, cy - h / 2, w, h, fill=colour, attrs=(("data-shape", "rect"), *attrs))


def density_bins(records: Sequence[DefectRecord], length_mm: float) -> tuple[float, dict[int, list[int]]]:
    """The density strips' bin width (mm) and per class the records per bin (by along centre)."""
    width = max(nice_step(length_mm, MAX_BINS), 10.0)
    count = max(1, math.ceil(length_mm / width - 1e-9))
    bins: dict[int, list[int]] = {}
    for record in records:
        centre = (record.along_start_mm + record.along_end_mm) / 2
        per_class = bins.setdefault(record.class_id, [0] * count)
        per_class[min(count - 1, max(0, int(centre // width)))] += 1
    return width, bins


def _density(records: Sequence[DefectRecord], scale: MapScale, class_ids: Sequence[int],
             class_names: Sequence[str]) -> list[Shape]:
    """Per class, a row of bars: defects per metre in each bin (height relative to the row's busiest bin)."""
    width, bins = density_bins(records, scale.length_mm)
    shapes = []
    for row, class_id in enumerate(class_ids):
        top = TOP_PX + STRIP_PX + DENSITY_GAP_PX + row * DENSITY_PX
        counts = bins.get(class_id, [])
        busiest = max(counts, default=0)
        colour = class_colour_hex(class_id - 1)
        shapes.append(Shape("rect", scale.x(0), top, scale.plot_px, DENSITY_PX - 4, fill="#f9fafb", stroke="#e5e7eb",
                            attrs=(("class", "density-row"), ("data-class", str(class_id)),
                                   ("data-bin-mm", _number(width)))))
        label = f"{_class_name(class_names, class_id)[:14]}"
        shapes.append(_text(LEFT_PX - 8, top + 11, label, 10, "end", _TEXT))
        shapes.append(_text(LEFT_PX - 8, top + 21, f"max {busiest / (width / 1000):.3g}/m", 9, "end", _MUTED))
        for k, n in enumerate(counts):
            if not n:
                continue
            x0, x1 = scale.x(k * width), scale.x(min((k + 1) * width, scale.length_mm))
            h = (DENSITY_PX - 6) * n / busiest
            shapes.append(Shape("rect", x0, top + DENSITY_PX - 5 - h, max(x1 - x0, 1.0), h, fill=colour,
                                attrs=(("class", "density"), ("data-class", str(class_id)),
                                       ("data-bin-start-mm", _number(k * width)), ("data-count", str(n)),
                                       ("data-per-m", _number(n / (width / 1000))))))
    return shapes


def _legend(class_ids: Sequence[int], counts: Mapping[int, int], class_names: Sequence[str], top: float) -> list[Shape]:
    shapes, x = [], float(LEFT_PX)
    for class_id in class_ids:
        shapes.append(Shape("rect", x, top - 10, 12, 12, fill=class_colour_hex(class_id - 1)))
        label = f"{class_id} {_class_name(class_names, class_id)}: {counts.get(class_id, 0)}"
        shapes.append(_text(x + 16, top, label, 12, attrs=(("class", "legend"), ("data-class", str(class_id)))))
        x += 16 + 7.2 * len(label) + 24
    shapes.append(_text(x, top, f"lines: {LONG_RATIO:g}x longer than wide; marks at least {MIN_MARK_PX} px", 10,
                        fill=_MUTED))
    return shapes


def _periodic(defect: PeriodicDefect, records: Sequence[DefectRecord], scale: MapScale) -> list[Shape]:
    """A periodic defect: a line linking its repeats' centres (under the marks), its period written above."""
    marks = [records[i] for i in defect.records if 0 <= i < len(records)]
    if len(marks) < 2:
        return []
    points = [(scale.x((r.along_start_mm + r.along_end_mm) / 2), scale.y((r.across_start_mm + r.across_end_mm) / 2))
              for r in marks]
    attrs = (("class", "periodic"), ("data-period-mm", _number(defect.period_mm)), ("data-roll", defect.roll),
             ("data-records", " ".join(str(i) for i in defect.records)))
    shapes = [Shape("line", x, y, x2=x2, y2=y2, stroke=_PERIODIC, width=1.5, attrs=attrs)
              for (x, y), (x2, y2) in zip(points, points[1:], strict=False)]
    roll = f" = {defect.roll}" if defect.roll else ""
    label = f"repeats every {defect.period_mm:.0f} mm{roll} ({defect.count}x)"
    shapes.append(_text(points[0][0], max(points[0][1] - 8, TOP_PX - 4), label, 11, fill=_PERIODIC,
                        attrs=(("class", "periodic-label"),)))
    return shapes


def _alarm_marks(alarms: Sequence[Alarm], scale: MapScale, line: Line) -> list[Shape]:
    """Each alarm with a position: a line across the strip at it, its id written above."""
    shapes = []
    for alarm in alarms:
        if alarm.position_mm is None:
            continue
        x = scale.x(alarm.position_mm)
        attrs = (("class", "alarm"), ("data-alarm-id", str(alarm.alarm_id)), ("data-rule", alarm.rule),
                 ("data-acknowledged", "true" if alarm.acknowledged else "false"))
        shapes += [Shape("line", x, scale.y(0.0), x2=x, y2=scale.y(line.strip_width_mm), stroke=_ALARM, width=1.0,
                         attrs=attrs),
                   _text(x, TOP_PX - 4, f"alarm {alarm.alarm_id}", 10, "middle", _ALARM)]
    return shapes


def map_shapes(line: Line, summary: CoilSummary, records: Sequence[DefectRecord], frames_url: str | None = None,
               class_names: Sequence[str] | None = None, periodic: Sequence[PeriodicDefect] = (),
               alarms: Sequence[Alarm] = ()) -> tuple[float, list[Shape]]:
    """The drawing: the canvas height and its shapes, in drawing order (the largest defects first,
    so that small ones on top of them stay visible)."""
    counts: dict[int, int] = {}
    for record in records:
        counts[record.class_id] = counts.get(record.class_id, 0) + 1
    known = set(counts) | {k for k, n in summary.defects_per_class.items() if n}
    names = tuple(class_names) if class_names is not None else default_class_names(max(known | {4}))
    class_ids = sorted(known | set(range(1, len(names) + 1)))
    scale = map_scale(line, summary, records)
    shapes = _title(summary, names, len(records)) + _strip(line, scale) + _axes(line, scale)
    for defect in periodic:
        shapes += _periodic(defect, records, scale)
    shapes += _alarm_marks(alarms, scale, line)
    order = sorted(range(len(records)), key=lambda i: (-records[i].area_mm2, i))
    shapes += [_mark(i, records[i], scale, frames_url) for i in order]
    shapes += _density(records, scale, class_ids, names)
    legend_top = TOP_PX + STRIP_PX + DENSITY_GAP_PX + len(class_ids) * DENSITY_PX + 18
    shapes += _legend(class_ids, counts, names, legend_top)
    return legend_top + 14, shapes


SVG_NS = "http://www.w3.org/2000/svg"


def _svg_element(shape: Shape) -> ET.Element:
    n = _number
    if shape.kind == "rect":
        element = ET.Element("rect", {"x": n(shape.x), "y": n(shape.y), "width": n(shape.w), "height": n(shape.h),
                                      "fill": shape.fill or "none"})
        if shape.opacity < 1:
            element.set("fill-opacity", n(shape.opacity))
        if shape.stroke:
            element.set("stroke", shape.stroke)
    elif shape.kind == "line":
        element = ET.Element("line", {"x1": n(shape.x), "y1": n(shape.y), "x2": n(shape.x2), "y2": n(shape.y2),
                                      "stroke": shape.stroke, "stroke-width": n(shape.width)})
    else:
        element = ET.Element("text", {"x": n(shape.x), "y": n(shape.y), "font-size": n(shape.size), "fill": shape.fill})
        if shape.anchor != "start":
            element.set("text-anchor", shape.anchor)
        element.text = shape.text
    for key, value in shape.attrs:
        element.set(key, value)
    return element


def shapes_svg(height: float, shapes: Sequence[Shape]) -> str:
    """The shapes as one SVG document (``data-*`` attributes kept), ``WIDTH_PX`` x ``height``."""
    size = {"width": str(WIDTH_PX), "height": _number(height), "viewBox": f"0 0 {WIDTH_PX} {_number(height)}"}
    root = ET.Element("svg", {"xmlns": SVG_NS, **size, "font-family": _FONT, "class": "coil-map"})
    root.append(ET.Element("rect", {"x": "0", "y": "0", "width": str(WIDTH_PX), "height": _number(height),
                                    "fill": "#ffffff"}))
    root.extend(_svg_element(shape) for shape in shapes)
    return ET.tostring(root, encoding="unicode")


def _bgr(colour: str) -> tuple[int, int, int]:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return b, g, r


def _paint(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour: str, opacity: float = 1.0) -> None:
    """Fills the pixels whose centres lie in ``[x0, x1) x [y0, y1)`` (at least one pixel), blended by ``opacity``."""
    left, right = sorted((round(x0), round(x1)))
    top, bottom = sorted((round(y0), round(y1)))
    window = canvas[max(top, 0):max(bottom, top + 1), max(left, 0):max(right, left + 1)]
    ink = np.array(_bgr(colour), np.float32)
    window[:] = np.rint(window * (1 - opacity) + ink * opacity).astype(np.uint8) if opacity < 1 else ink


def _raster_text(canvas: np.ndarray, shape: Shape) -> None:
    text = shape.text.encode("ascii", "replace").decode("ascii")
    scale = shape.size / 30.0
    (width, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x = shape.x - {"start": 0, "middle": width / 2, "end": width}[shape.anchor]
    cv2.putText(canvas, text, (round(x), round(shape.y)), cv2.FONT_HERSHEY_SIMPLEX, scale, _bgr(shape.fill), 1,
                cv2.LINE_AA)


def shapes_png(height: float, shapes: Sequence[Shape]) -> bytes:
    """The shapes rasterised with OpenCV: the SVG's drawing pixel for pixel in place and size (the
    marks are axis-aligned, so rectangles and lines fill exactly the pixels the SVG covers);
    text is Hershey-drawn, so it looks plainer than in the SVG."""
    canvas = np.full((math.ceil(height), WIDTH_PX, 3), 255, np.uint8)
    for shape in shapes:
        if shape.kind == "rect":
            if shape.fill:
                _paint(canvas, shape.x, shape.y, shape.x + shape.w, shape.y + shape.h, shape.fill, shape.opacity)
            if shape.stroke:
                x0, y0, x1, y1 = round(shape.x), round(shape.y), round(shape.x + shape.w), round(shape.y + shape.h)
                cv2.rectangle(canvas, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), _bgr(shape.stroke), 1)
        elif shape.kind == "line":
            if shape.x != shape.x2 and shape.y != shape.y2:
                raise ValueError(f"the rasteriser draws axis-aligned lines only, got {shape}")
            half = shape.width / 2
            if shape.y == shape.y2:
                _paint(canvas, shape.x, shape.y - half, shape.x2, shape.y + half, shape.stroke)
            else:
                _paint(canvas, shape.x - half, shape.y, shape.x + half, shape.y2, shape.stroke)
        else:
            _raster_text(canvas, shape)
    ok, data = cv2.imencode(".png", canvas, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RuntimeError("OpenCV could not encode the coil map as PNG")
    return data.tobytes()


def map_svg(line: Line, summary: CoilSummary, records: Sequence[DefectRecord], frames_url: str | None = None,
            class_names: Sequence[str] | None = None, periodic: Sequence[PeriodicDefect] = (),
            alarms: Sequence[Alarm] = ()) -> str:
    """The coil map as an SVG document.

    Args:
        line: the line's geometry (lanes, strip width).
        summary: the coil's summary (id, state, length, counts).
        records: its defect records; mark ``data-record`` is the index in this sequence.
        frames_url: a template for each mark's ``data-frame-url`` (``{record}`` and the URL-quoted
            ``{coil_id}`` filled in), e.g. a page's link to the frames a defect came from; None: no such attribute.
        class_names: one name per class (class ``k`` at index ``k - 1``); default the model's default names.
        periodic: the coil's periodic defects (:mod:`coils.periodic`): their repeats linked, the period written.
        alarms: the coil's alarms (:mod:`coils.alarms`): a line across the strip at each one's position.
    """
    return shapes_svg(*map_shapes(line, summary, records, frames_url, class_names, periodic, alarms))


def render_map(line: Line, summary: CoilSummary, records: Sequence[DefectRecord], out: Path,
               class_names: Sequence[str] | None = None, periodic: Sequence[PeriodicDefect] = ()) -> Path:
    """Writes the coil map to ``out``: SVG for ``.svg``, PNG (the same drawing, rasterised) for ``.png``.

    Raises:
        ValueError: ``out``'s suffix is neither (checked before anything is drawn).
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"coil map {out}: suffix {out.suffix!r} is not one of {', '.join(SUFFIXES)}")
    height, shapes = map_shapes(line, summary, records, None, class_names, periodic)
    content = shapes_svg(height, shapes) if suffix == ".svg" else shapes_png(height, shapes)
    return atomic_write(out, content)


__all__ = ["LONG_RATIO", "MIN_MARK_PX", "MapScale", "Shape", "density_bins", "is_long", "map_scale", "map_shapes",
           "map_svg", "nice_step", "render_map", "shapes_png", "shapes_svg"]
