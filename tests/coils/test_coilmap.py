"""The coil map: records built from planted masks come out as one mark each at their scaled place,
over the camera lanes, with density strips that count them, in SVG and in the PNG drawn from it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from coils.coilmap import MIN_MARK_PX, map_scale, map_svg, render_map
from coils.line import Line
from coils.periodic import PeriodicDefect
from coils.records import DefectRecord, RecordBuilder
from coils.summary import CoilFacts, CoilSummary, summarise
from engine.overlay import class_colour

ALONG, ACROSS, OVERLAP, FRAMES = 64, 100, 10, 20  # 1 mm pixels: a 1280 mm coil, 190 mm strip
STRIP_MM = 2 * ACROSS - OVERLAP
SVG = "{http://www.w3.org/2000/svg}"


def planted_line() -> Line:
    cameras = [{"camera_id": f"cam{c}", "lane_start_mm": c * (ACROSS - OVERLAP), "mm_per_px_across": 1.0,
                "mm_per_px_along": 1.0, "along_axis": "y", "frame_width_px": ACROSS, "frame_height_px": ALONG}
               for c in range(2)]
    return Line.from_dict({"name": "map-test", "strip_width_mm": STRIP_MM, "cameras": cameras})


def planted_canvas() -> np.ndarray:
    """``[4, along, across]``: a stain, a long scratch over frames, a blob over the lanes' overlap, a pit."""
    canvas = np.zeros((4, FRAMES * ALONG, STRIP_MM), np.uint8)
    canvas[0, 10:40, 20:60] = 1          # class 1: 30 x 40 mm, camera 0
    canvas[2, 70:400, 150:153] = 1       # class 3: 330 mm long, 3 mm wide: a line, over 6 frames
    canvas[1, 500:540, 80:110] = 1       # class 2: over the overlap (90..100 mm): one record from two lanes
    canvas[3, 1000:1003, 30:33] = 1      # class 4: 3 x 3 mm, drawn at the minimum size
    canvas[0, 1200:1230, 120:170] = 1    # class 1 again, near the tail
    return canvas


def planted_records(line: Line, coil_id: str = "C-map") -> list[DefectRecord]:
    canvas, builder = planted_canvas(), RecordBuilder(line)
    for c, camera in enumerate(line.cameras):
        left = c * (ACROSS - OVERLAP)
        for f in range(FRAMES):
            masks = np.ascontiguousarray(canvas[:, f * ALONG:(f + 1) * ALONG, left:left + ACROSS])
            builder.add_frame(coil_id, camera.camera_id, f, f * ALONG, masks)
    return builder.records(coil_id)


def summary_of(records: list[DefectRecord], coil_id: str = "C-map", state: str = "closed") -> CoilSummary:
    closed = state == "closed"
    facts = CoilFacts(coil_id=coil_id, state=state, opened_unix_s=1.0e9, last_frame_unix_s=1.0e9 + 60,
                      closed_unix_s=1.0e9 + 61 if closed else None, close_reason="end" if closed else "",
                      length_mm=float(FRAMES * ALONG), frames=2 * FRAMES, late_frames=0)
    return summarise(facts, records)


@pytest.fixture(scope="module")
def coil():
    line = planted_line()
    records = planted_records(line)
    return line, summary_of(records), records


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def by_class(root: ET.Element, css: str) -> list[ET.Element]:
    return [e for e in root.iter() if e.get("class") == css]


def strip_scale(root: ET.Element):
    """(x of along 0, px per mm along, y of across 0, px per mm across), read from the strip's box."""
    (strip,) = by_class(root, "strip")
    length, width = float(strip.get("data-length-mm")), float(strip.get("data-width-mm"))
    return (float(strip.get("x")), float(strip.get("width")) / length, float(strip.get("y")),
            float(strip.get("height")) / width)


def mark_box(mark: ET.Element) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) a mark covers: a rect's box, or a line's length by its stroke width."""
    if mark.tag == SVG + "rect":
        x, y = float(mark.get("x")), float(mark.get("y"))
        return x, y, x + float(mark.get("width")), y + float(mark.get("height"))
    x1, y1, x2, y2 = (float(mark.get(k)) for k in ("x1", "y1", "x2", "y2"))
    half = float(mark.get("stroke-width")) / 2
    return (x1, y1 - half, x2, y2 + half) if y1 == y2 else (x1 - half, y1, x2 + half, y2)


def expected_box(record: DefectRecord, scale) -> tuple[float, float, float, float]:
    x0, sx, y0, sy = scale
    cx = x0 + (record.along_start_mm + record.along_end_mm) / 2 * sx
    cy = y0 + (record.across_start_mm + record.across_end_mm) / 2 * sy
    w, h = max(record.length_mm * sx, MIN_MARK_PX), max(record.width_mm * sy, MIN_MARK_PX)
    if record.length_mm >= 4 * record.width_mm:
        h = max(record.width_mm * sy, 3)
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def test_the_planted_masks_make_five_records(coil) -> None:
    _, _, records = coil
    assert [(r.class_id, r.along_start_mm, r.across_start_mm) for r in records] == [
        (1, 10, 20), (3, 70, 150), (2, 500, 80), (4, 1000, 30), (1, 1200, 120)]
    assert records[2].cameras == ("cam0", "cam1")


def test_each_record_is_one_mark_at_its_scaled_place_with_its_data(coil) -> None:
    line, summary, records = coil
    root = parse(map_svg(line, summary, records, frames_url="/coils/{coil_id}/records/{record}"))
    marks = by_class(root, "defect")
    assert sorted(int(m.get("data-record")) for m in marks) == list(range(len(records)))
    scale = strip_scale(root)
    assert scale[1] == pytest.approx(1080 / 1280) and scale[3] == pytest.approx(260 / STRIP_MM)
    for mark in marks:
        index = int(mark.get("data-record"))
        record = records[index]
        assert int(mark.get("data-class")) == record.class_id
        assert float(mark.get("data-along-start-mm")) == record.along_start_mm
        assert float(mark.get("data-across-end-mm")) == record.across_end_mm
        assert mark.get("data-frame-url") == f"/coils/C-map/records/{index}"
        assert mark.get("data-shape") == ("line" if record.class_id == 3 else "rect")
        colour = mark.get("stroke") if record.class_id == 3 else mark.get("fill")
        b, g, r = class_colour(record.class_id - 1)
        assert colour == f"#{r:02x}{g:02x}{b:02x}"
        assert mark_box(mark) == pytest.approx(expected_box(record, scale), abs=0.01)
    pit = next(m for m in marks if m.get("data-class") == "4")
    assert float(pit.get("width")) == MIN_MARK_PX == float(pit.get("height"))


def test_the_lanes_are_bands_whose_overlap_shows(coil) -> None:
    line, summary, records = coil
    root = parse(map_svg(line, summary, records))
    lanes = by_class(root, "lane")
    x0, _, y0, sy = strip_scale(root)
    assert [lane.get("data-camera") for lane in lanes] == ["cam0", "cam1"]
    for lane, camera in zip(lanes, line.cameras):
        assert float(lane.get("y")) == pytest.approx(y0 + camera.lane_start_mm * sy, abs=0.01)
        assert float(lane.get("height")) == pytest.approx(ACROSS * sy, abs=0.01)
        assert float(lane.get("fill-opacity")) < 1
    first_end = float(lanes[0].get("y")) + float(lanes[0].get("height"))
    assert first_end - float(lanes[1].get("y")) == pytest.approx(OVERLAP * sy, abs=0.01)


def test_the_density_strips_count_the_records_per_bin(coil) -> None:
    line, summary, records = coil
    root = parse(map_svg(line, summary, records))
    rows = {int(r.get("data-class")): float(r.get("data-bin-mm")) for r in by_class(root, "density-row")}
    assert sorted(rows) == [1, 2, 3, 4]
    bins = by_class(root, "density")
    for class_id, width in rows.items():
        want: dict[float, int] = {}
        for r in records:
            if r.class_id == class_id:
                start = ((r.along_start_mm + r.along_end_mm) / 2 // width) * width
                want[start] = want.get(start, 0) + 1
        got = {float(b.get("data-bin-start-mm")): int(b.get("data-count")) for b in bins
               if int(b.get("data-class")) == class_id}
        assert got == want
        for b in bins:
            if int(b.get("data-class")) == class_id:
                assert float(b.get("data-per-m")) == pytest.approx(int(b.get("data-count")) / (width / 1000), rel=1e-3)


def test_the_title_and_legend_say_the_coil_and_its_counts(coil) -> None:
    line, summary, records = coil
    svg = map_svg(line, summary, records)
    root = parse(svg)
    (title,) = by_class(root, "title")
    assert title.text.startswith("coil C-map: closed (end), 1.3 m, 40 frames, 5 defects")
    legend = [e.text for e in by_class(root, "legend")]
    assert legend == ["1 pits/dents: 2", "2 stains: 1", "3 scratches: 1", "4 cracks/scabs: 1"]
    assert svg == map_svg(line, summary, records)  # deterministic


def test_the_png_is_the_same_drawing(coil, tmp_path: Path) -> None:
    line, summary, records = coil
    out = render_map(line, summary, records, tmp_path / "map.png")
    picture = cv2.imread(str(out), cv2.IMREAD_COLOR)
    root = parse(map_svg(line, summary, records))
    assert picture.shape[:2] == (round(float(root.get("height"))), 1200)
    scale = strip_scale(root)
    for index in (0, 1, 2, 4):  # the pit is minimum-sized, the others to scale
        record = records[index]
        x0, y0, x1, y1 = expected_box(record, scale)
        cx, cy = round((x0 + x1) / 2), round((y0 + y1) / 2)
        colour = np.array(class_colour(record.class_id - 1), np.uint8)
        assert (picture[cy, cx] == colour).all(), f"record {index} at ({cx}, {cy})"
        row = np.all(picture[cy] == colour, axis=1)
        column = np.all(picture[:, cx] == colour, axis=1)
        assert abs(_run(row, cx) - (x1 - x0)) <= 1.0, f"record {index}: width"
        assert abs(_run(column, cy) - (y1 - y0)) <= 1.0, f"record {index}: height"
    svg = render_map(line, summary, records, tmp_path / "map.SVG")
    assert svg.read_text() == map_svg(line, summary, records)


def _run(inked: np.ndarray, at: int) -> int:
    """Length of the run of True through index ``at``."""
    start, end = at, at
    while start > 0 and inked[start - 1]:
        start -= 1
    while end + 1 < len(inked) and inked[end + 1]:
        end += 1
    return end - start + 1


def test_a_suffix_other_than_png_or_svg_is_refused_by_name(coil, tmp_path: Path) -> None:
    line, summary, records = coil
    with pytest.raises(ValueError, match=r"suffix '\.jpg' is not one of \.png, \.svg"):
        render_map(line, summary, records, tmp_path / "map.jpg")
    assert not (tmp_path / "map.jpg").exists()


def test_an_open_coil_without_records_draws_its_strip(coil) -> None:
    line, _, _ = coil
    root = parse(map_svg(line, summary_of([], state="open"), []))
    assert by_class(root, "defect") == [] and by_class(root, "density") == []
    assert by_class(root, "title")[0].text.startswith("coil C-map: open, 1.3 m")


def test_the_frame_url_carries_the_coil_id_quoted(coil) -> None:
    line, _, _ = coil
    records = planted_records(line, "C 1/2")
    root = parse(map_svg(line, summary_of(records, "C 1/2"), records, frames_url="/coils/{coil_id}/records/{record}"))
    assert {m.get("data-frame-url") for m in by_class(root, "defect")} == {
        f"/coils/C%201%2F2/records/{i}" for i in range(len(records))}
    assert by_class(root, "title")[0].text.startswith("coil C 1/2: closed")


def test_a_periodic_defect_is_drawn_linked_with_its_period_written() -> None:
    line = planted_line()
    records = [DefectRecord("P", 1, a, a + 3, 10.0, 13.0, 9.0, None, (), ()) for a in (7.0, 107.0, 207.0, 307.0)]
    summary = summarise(CoilFacts("P", "closed", 0.0, 1.0, 2.0, "end", 400.0, 20, 0), records)
    periodic = [PeriodicDefect(1, 10.0, 13.0, 100.0, 0.999, 8.5, 308.5, 4, "work-roll", (0, 1, 2, 3))]
    svg = map_svg(line, summary, records, periodic=periodic)
    root = ET.fromstring(svg)
    links = [e for e in root.iter(f"{SVG}line") if e.get("class") == "periodic"]
    scale = map_scale(line, summary, records)
    assert [(float(e.get("x1")), float(e.get("x2"))) for e in links] == [
        (pytest.approx(scale.x(a + 1.5), abs=1e-3), pytest.approx(scale.x(a + 101.5), abs=1e-3)) for a in (7, 107, 207)]
    assert {e.get("data-roll") for e in links} == {"work-roll"}
    labels = [e.text for e in root.iter(f"{SVG}text") if e.get("class") == "periodic-label"]
    assert labels == ["repeats every 100 mm = work-roll (4x)"]
    assert "periodic" not in map_svg(line, summary, records)


def test_a_coils_alarms_are_marked_across_the_strip_at_their_position() -> None:
    from coils.alarms import Alarm

    line = planted_line()
    records = [DefectRecord("P", 1, 100.0, 103.0, 10.0, 13.0, 9.0, None, (), ())]
    summary = summarise(CoilFacts("P", "open", 0.0, 1.0, None, "", 400.0, 20, 0), records)
    alarms = [Alarm(7, "roll-mark", "periodic", 800, "P", "cam0", 250.0, "m", 1.0),
              Alarm(8, "down", "not_serving", 900, "", "", None, "m", 2.0)]
    root = ET.fromstring(map_svg(line, summary, records, alarms=alarms))
    [mark] = [e for e in root.iter(f"{SVG}line") if e.get("class") == "alarm"]
    scale = map_scale(line, summary, records)
    assert float(mark.get("x1")) == pytest.approx(scale.x(250.0), abs=1e-3) == float(mark.get("x2"))
    assert (float(mark.get("y1")), float(mark.get("y2"))) == (pytest.approx(scale.y(0.0), abs=1e-3),
                                                             pytest.approx(scale.y(STRIP_MM), abs=1e-3))
    assert (mark.get("data-alarm-id"), mark.get("data-rule"), mark.get("data-acknowledged")) == ("7", "roll-mark",
                                                                                                 "false")
