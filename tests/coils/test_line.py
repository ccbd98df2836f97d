"""``line.yaml``: read back equal, every wrong value refused with the key and the camera named."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from coils.line import Line, LineError, load_line, write_line


def line_dict(**changes) -> dict:
    """Two cameras of 1600 x 256 frames at 0.5 mm/px overlapping by 20 mm, one roll."""
    data = {
        "name": "finishing-2",
        "strip_width_mm": 1580.0,
        "cameras": [
            {"camera_id": "top-0", "lane_start_mm": 0.0, "mm_per_px_across": 0.5, "mm_per_px_along": 0.5,
             "along_axis": "y", "frame_width_px": 1600, "frame_height_px": 256},
            {"camera_id": "top-1", "lane_start_mm": 780.0, "mm_per_px_across": 0.5, "mm_per_px_along": 0.5,
             "along_axis": "y", "frame_width_px": 1600, "frame_height_px": 256},
        ],
        "rolls": [{"name": "work-roll", "diameter_mm": 600.0}],
    }
    data.update(changes)
    return data


def camera(**changes) -> dict:
    entry = dict(line_dict()["cameras"][1])
    entry.update(changes)
    return entry


def test_a_line_reads_back_equal_and_knows_its_lanes(tmp_path: Path) -> None:
    line = Line.from_dict(line_dict())
    assert load_line(write_line(tmp_path / "line.yaml", line)) == line
    top1 = line.camera("top-1")
    assert (top1.pixels_across, top1.pixels_along, top1.lane_end_mm, top1.frame_length_mm) == (1600, 256, 1580, 128)
    # The 20 mm overlap is split at its middle for areas.
    assert line.owned_across("top-0") == (0.0, 790.0) and line.owned_across("top-1") == (790.0, 1580.0)
    assert math.isclose(line.rolls[0].circumference_mm, math.pi * 600)
    with pytest.raises(KeyError, match="top-0, top-1"):
        line.camera("bottom-0")


def test_an_x_axis_camera_runs_along_its_columns() -> None:
    line = Line.from_dict(line_dict(cameras=[camera(along_axis="x", lane_start_mm=0.0)], strip_width_mm=256.0))
    geometry = line.camera("top-1")
    assert (geometry.pixels_across, geometry.pixels_along, geometry.frame_length_mm) == (256, 1600, 800)


@pytest.mark.parametrize("data,message", [
    (line_dict(colour="blue"), "unknown key.*colour"),
    (line_dict(strip_width_mm=0), "strip_width_mm must be a positive number"),
    (line_dict(cameras=[]), "cameras must be a non-empty list"),
    (line_dict(cameras=[camera(mm_per_px_across=-0.5)]), r"cameras\[0\] \(camera 'top-1'\): mm_per_px_across must be"),
    (line_dict(cameras=[camera(mm_per_px_along=0)]), r"camera 'top-1'\): mm_per_px_along must be a positive"),
    (line_dict(cameras=[camera(along_axis="z")]), r"camera 'top-1'\): along_axis must be 'x' or 'y'"),
    (line_dict(cameras=[camera(frame_width_px=12.5)]), r"camera 'top-1'\): frame_width_px must be a whole number"),
    (line_dict(cameras=[camera(lens="wide")]), r"camera 'top-1'\): unknown key.*lens"),
    (line_dict(cameras=[camera(lane_start_mm=1600.0)]), "camera 'top-1': its lane 1600..2400 mm lies outside"),
    (line_dict(cameras=[camera(lane_start_mm=-900.0)]), "camera 'top-1': its lane -900..-100 mm lies outside"),
    (line_dict(cameras=[camera(), camera()]), "camera id 'top-1' is listed twice"),
    (line_dict(cameras=[camera(), camera(camera_id="top-2", lane_start_mm=790.0, frame_width_px=100)]),
     "camera 'top-2': its lane lies inside camera 'top-1'"),
    (line_dict(cameras=[{k: v for k, v in camera().items() if k != "mm_per_px_along"}]),
     r"camera 'top-1'\): missing key.*mm_per_px_along"),
    (line_dict(rolls=[{"name": "backup", "diameter_mm": "big"}]), r"rolls\[0\] \(roll 'backup'\): diameter_mm must"),
])
def test_a_wrong_value_is_refused_naming_its_key_and_camera(data: dict, message: str) -> None:
    with pytest.raises(LineError, match=message):
        Line.from_dict(data, source="line.yaml")


def test_a_file_that_is_not_a_line_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such line"):
        load_line(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(LineError, match="not a YAML file"):
        load_line(bad)
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: a\nname: b\nstrip_width_mm: 10\ncameras: []\n")
    with pytest.raises(LineError, match="'name' is given twice"):
        load_line(twice)
