"""Defect records: planted defects on a coil canvas, cut into the frames of two overlapping cameras,
come back as the canvas's own connected components in coil coordinates, whatever the frame order."""

from __future__ import annotations

import pickle
import random

import cv2
import numpy as np
import pytest

from coils.line import Line
from coils.records import _COMPONENT_SCALARS, FrameKey, RecordBuilder, masks_components

ALONG, ACROSS, OVERLAP = 20, 30, 6  # frame: 20 rows along x 30 columns across; lanes overlap 6 px
FRAMES = 12
STRIP = 2 * ACROSS - OVERLAP  # 54 px = 54 mm at 1 mm/px


def two_cameras(along_axis: str = "y", mm_per_px: float = 1.0) -> Line:
    height, width = (ALONG, ACROSS) if along_axis == "y" else (ACROSS, ALONG)
    cameras = [{"camera_id": f"cam{c}", "lane_start_mm": c * (ACROSS - OVERLAP) * mm_per_px,
                "mm_per_px_across": mm_per_px, "mm_per_px_along": mm_per_px, "along_axis": along_axis,
                "frame_width_px": width, "frame_height_px": height} for c in range(2)]
    return Line.from_dict({"name": "test", "strip_width_mm": STRIP * mm_per_px, "cameras": cameras})


def frames_of(canvas: np.ndarray, line: Line, mm_per_px: float = 1.0) -> list[tuple[str, int, float, np.ndarray]]:
    """``canvas`` ``[C, along, across]`` as the cameras see it: (camera, frame id, position, masks ``[C, H, W]``)."""
    out = []
    for c, camera in enumerate(line.cameras):
        left = c * (ACROSS - OVERLAP)
        for f in range(canvas.shape[1] // ALONG):
            masks = canvas[:, f * ALONG:(f + 1) * ALONG, left:left + ACROSS]
            if camera.along_axis == "x":
                masks = masks.transpose(0, 2, 1)
            out.append((camera.camera_id, f, f * ALONG * mm_per_px, np.ascontiguousarray(masks)))
    return out


def canvas_truth(canvas: np.ndarray, mm_per_px: float = 1.0) -> list[tuple]:
    """The canvas's own components: (along start, along end, across start, across end, class, area)."""
    found = []
    for k in range(canvas.shape[0]):
        count, _, stats, _ = cv2.connectedComponentsWithStats(canvas[k].astype(np.uint8), connectivity=8)
        for left, top, width, height, area in stats[1:count]:
            found.append((top * mm_per_px, (top + height) * mm_per_px, left * mm_per_px, (left + width) * mm_per_px,
                          k + 1, area * mm_per_px ** 2))
    return sorted(found)


def built(line: Line, frames, order=None, coil: str = "C1") -> list:
    builder = RecordBuilder(line)
    for i in order if order is not None else range(len(frames)):
        camera, frame_id, position, masks = frames[i]
        builder.add_frame(coil, camera, frame_id, position, masks)
    return builder.records(coil)


def as_truth(records) -> list[tuple]:
    return sorted((r.along_start_mm, r.along_end_mm, r.across_start_mm, r.across_end_mm, r.class_id,
                   pytest.approx(r.area_mm2)) for r in records)


def planted() -> np.ndarray:
    """The named cases on one canvas (class 1 unless said): see the test below."""
    canvas = np.zeros((2, FRAMES * ALONG, STRIP), np.uint8)
    canvas[0, 15:25, 2:8] = 1                       # over the boundary of frames 0 and 1, camera 0 only
    canvas[0, 3:10, 20:36] = 1                      # over the lanes' overlap (24..30), frame 0
    canvas[0, 35:45, 18:40] = 1                     # both at once: frames 1-2, both cameras
    cv2.line(canvas[1], (10, 50), (16, 229), 1, 2)  # class 2: a long scratch over frames 2..11
    canvas[0, 55:60, 44:50] = 1                     # ends on frame 2's last row ...
    canvas[0, 61:66, 44:50] = 1                     # ... starts one clean row into frame 3: two defects
    canvas[0, 75:80, 22:24] = 1                     # two defects one clean column apart in the overlap
    canvas[0, 75:80, 25:27] = 1
    canvas[0, 97:100, 40:42] = 1                    # touching across the boundary by a corner only
    canvas[0, 100:103, 42:44] = 1
    return canvas


def test_the_planted_cases_are_one_record_per_defect() -> None:
    canvas = planted()
    line = two_cameras()
    records = built(line, frames_of(canvas, line))
    assert as_truth(records) == canvas_truth(canvas)
    assert len(records) == 9
    by_place = {(r.class_id, r.along_start_mm, r.across_start_mm): r for r in records}
    boundary = by_place[(1, 15.0, 2.0)]
    assert boundary.frames == (("cam0", 0), ("cam0", 1)) and boundary.area_mm2 == 60
    lanes = by_place[(1, 3.0, 20.0)]
    assert lanes.frames == (("cam0", 0), ("cam1", 0)) and lanes.cameras == ("cam0", "cam1")
    assert lanes.area_mm2 == 7 * 16  # the overlap's pixels counted once
    both = by_place[(1, 35.0, 18.0)]
    assert both.frames == (("cam0", 1), ("cam0", 2), ("cam1", 1), ("cam1", 2)) and both.area_mm2 == 220
    scratch = next(r for r in records if r.class_id == 2)
    assert scratch.along_end_mm - scratch.along_start_mm >= 179 and len(scratch.frames) == 10
    assert (1, 55.0, 44.0) in by_place and (1, 61.0, 44.0) in by_place
    assert (1, 75.0, 22.0) in by_place and (1, 75.0, 25.0) in by_place
    assert by_place[(1, 97.0, 40.0)].along_end_mm == 103  # one record: 8-connected over the boundary


def random_blobs(seed: int, longest: int, rotated: bool) -> np.ndarray:
    """25 random filled ellipses over both classes of a canvas ``[2, along, across]``, axes up to 7 by ``longest``."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((2, FRAMES * ALONG, STRIP), np.uint8)
    for _ in range(25):
        k, centre = int(rng.integers(2)), (int(rng.integers(STRIP)), int(rng.integers(FRAMES * ALONG)))
        axes = (int(rng.integers(1, 8)), int(rng.integers(1, longest)))
        cv2.ellipse(canvas[k], centre, axes, float(rng.uniform(0, 180)) if rotated else 0.0, 0, 360, 1, -1)
    return canvas


@pytest.mark.parametrize("seed", range(6))
def test_random_blobs_come_back_as_the_canvas_components_in_any_frame_order(seed: int) -> None:
    canvas = random_blobs(seed, longest=14, rotated=True)
    line = two_cameras()
    frames = frames_of(canvas, line)
    order = list(range(len(frames)))
    random.Random(seed).shuffle(order)
    in_order, shuffled = built(line, frames), built(line, frames, order)
    assert as_truth(in_order) == canvas_truth(canvas)
    assert shuffled == in_order


@pytest.mark.parametrize("seed", range(3))
def test_records_asked_after_every_frame_are_those_of_the_frames_so_far(seed: int) -> None:
    canvas = random_blobs(seed, longest=30, rotated=False)
    line = two_cameras()
    frames = frames_of(canvas, line)
    order = list(range(len(frames)))
    random.Random(seed).shuffle(order)
    live = RecordBuilder(line)
    for n, i in enumerate(order):
        camera, frame_id, position, masks = frames[i]
        live.add_frame("C1", camera, frame_id, position, masks)
        assert live.records("C1") == built(line, frames, order[:n + 1])  # kept records, merged ones made again
    assert as_truth(live.records("C1")) == canvas_truth(canvas)


def test_a_resent_frame_changes_nothing_and_coils_stay_apart() -> None:
    canvas = planted()
    line = two_cameras()
    frames = frames_of(canvas, line)
    builder = RecordBuilder(line)
    for camera, frame_id, position, masks in frames:
        assert builder.add_frame("C1", camera, frame_id, position, masks)
    once = builder.records("C1")
    for camera, frame_id, position, masks in frames:
        assert not builder.add_frame("C1", camera, frame_id, position, masks)
    assert builder.records("C1") == once and builder.frames_added == len(frames)
    camera, frame_id, position, masks = frames[0]
    assert builder.add_frame("C2", camera, frame_id, position, masks)  # the same frame id on another coil
    assert builder.coils() == ["C1", "C2"] and builder.records("C1") == once
    assert all(r.coil_id == "C2" for r in builder.records("C2"))


def test_cameras_whose_columns_run_along_and_larger_pixels_give_the_same_records() -> None:
    canvas = planted()
    line = two_cameras(along_axis="x", mm_per_px=0.5)
    records = built(line, frames_of(canvas, line, mm_per_px=0.5))
    assert as_truth(records) == canvas_truth(canvas, mm_per_px=0.5)


def test_the_largest_probability_inside_each_record() -> None:
    canvas = np.zeros((1, 2 * ALONG, STRIP), np.uint8)
    canvas[0, 15:25, 2:8] = 1
    line = two_cameras()
    builder = RecordBuilder(line)
    for camera, frame_id, position, masks in frames_of(canvas, line):
        probabilities = masks.astype(np.float32) * (0.6 + 0.1 * frame_id)
        probabilities[:, 0, 0] = 0.99  # outside every component: never counted
        builder.add_frame("C1", camera, frame_id, position, masks, probabilities)
    (record,) = builder.records("C1")
    assert record.max_probability == pytest.approx(0.7)


def test_a_frame_of_the_wrong_size_or_an_unknown_camera_is_refused() -> None:
    builder = RecordBuilder(two_cameras())
    with pytest.raises(ValueError, match="frame 10x30 is not the line's 20x30"):
        builder.add_frame("C1", "cam0", 0, 0.0, np.zeros((1, 10, 30), np.uint8))
    with pytest.raises(KeyError, match="camera 'cam9' is not in line"):
        builder.add_frame("C1", "cam9", 0, 0.0, np.zeros((1, 20, 30), np.uint8))
    assert builder.frames_added == 0


@pytest.mark.parametrize("jitter_mm", [-0.3, 0.3])
def test_encoder_jitter_under_the_gap_still_joins_boundaries_and_keeps_one_clean_row_apart(jitter_mm: float) -> None:
    canvas = planted()
    line = two_cameras()
    # Every odd frame's encoder reading is off by jitter_mm (under the default gap of half a pixel).
    frames = [(c, f, p + (jitter_mm if f % 2 else 0.0), m) for c, f, p, m in frames_of(canvas, line)]
    records = built(line, frames)
    assert len(records) == 9
    by_place = {(r.class_id, round(r.along_start_mm), round(r.across_start_mm)): r for r in records}
    assert by_place[(1, 15, 2)].frames == (("cam0", 0), ("cam0", 1))  # still one record over the boundary
    assert (1, 55, 44) in by_place and (1, 61, 44) in by_place  # still two records one clean row apart


def test_a_wider_gap_joins_what_lies_within_it() -> None:
    canvas = planted()
    line = two_cameras()
    builder = RecordBuilder(line, gap_mm=1.5)
    for camera, frame_id, position, masks in frames_of(canvas, line):
        builder.add_frame("C1", camera, frame_id, position, masks)
    places = {(r.along_start_mm, r.across_start_mm) for r in builder.records("C1")}
    assert (55.0, 44.0) in places and (61.0, 44.0) not in places  # one row apart over a boundary: joined
    with pytest.raises(ValueError, match="gap_mm must be a finite number >= 0"):
        RecordBuilder(line, gap_mm=-1)


def test_a_component_pickles_with_its_packed_mask_and_comes_back_whole() -> None:
    line = two_cameras()
    canvas = planted()
    parts = [c for camera, frame_id, position, masks in frames_of(canvas, line)
             for c in masks_components(line, FrameKey("C1", camera, frame_id), position, masks, None,
                                       line.owned_across(camera))]
    assert len(parts) > 10
    for part in parts:
        data = pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL)
        back = pickle.loads(data)
        assert back.key == part.key and back.packed_mask() == part.packed_mask()
        # the mask stays packed until read: the box's extent needs none of it
        assert "mask" not in vars(back) and back.box_shape == part.mask.shape
        assert (back.along_end_mm, back.across_end_mm) == (part.along_end_mm, part.across_end_mm)
        assert pickle.loads(pickle.dumps(back)).packed_mask() == part.packed_mask()  # and pickles again as it came
        assert "mask" not in vars(back)
        assert np.array_equal(back.mask, part.mask) and back.mask.dtype == part.mask.dtype
        assert back.mask is back.mask  # unpacked once
        assert [getattr(back, n) for n in _COMPONENT_SCALARS] == [getattr(part, n) for n in _COMPONENT_SCALARS]
        assert len(data) < 200 + part.mask.size // 8  # the mask travels packed, not as an array of bools
    with pytest.raises(AttributeError, match="no attribute 'colour'"):
        back.colour  # noqa: B018 - only the mask is looked up lazily
