"""The close's merge (coils.columns) against the record builder, and the pixel-grid touch test against the
resampling one: the fast paths must give exactly the same answers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from coils.columns import ComponentColumns, merged_records
from coils.merge import Boxes, BoxIndex, boxes_meet, pixels_touch, touch_resampled
from coils.records import Component, FrameKey, RecordBuilder, default_gap_mm, masks_components, pack_mask
from tests.coils.test_records import ALONG, FRAMES, STRIP, built, frames_of, planted, two_cameras


def columns_of(line, frames, coil_id: str = "C1") -> ComponentColumns:
    """The frames' components as the store reads them back: rows sorted by camera and frame."""
    rows = []
    for camera, frame_id, position, masks in sorted(frames, key=lambda f: (f[0], f[1])):
        key = FrameKey(coil_id, camera, frame_id)
        for c in masks_components(line, key, position, masks):
            rows.append((camera, frame_id, c.class_id, c.along_start_mm, c.across_start_mm, c.mm_per_px_along,
                         c.mm_per_px_across, c.pixel_count, c.area_mm2, c.max_probability, *c.mask.shape,
                         pack_mask(c.mask)))
    return ComponentColumns.from_rows(coil_id, rows)


def random_canvas(seed: int, defects: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    canvas = np.zeros((2, FRAMES * ALONG, STRIP), np.uint8)
    for _ in range(defects):
        k, centre = int(rng.integers(2)), (int(rng.integers(STRIP)), int(rng.integers(FRAMES * ALONG)))
        axes = (int(rng.integers(1, 8)), int(rng.integers(1, 14)))
        cv2.ellipse(canvas[k], centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return canvas


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("along_axis,mm_per_px,jitter_mm", [("y", 1.0, 0.0), ("x", 0.5, 0.0), ("y", 1.0, 0.3)])
def test_merged_columns_are_the_builders_records(seed: int, along_axis: str, mm_per_px: float,
                                                 jitter_mm: float) -> None:
    line = two_cameras(along_axis=along_axis, mm_per_px=mm_per_px)
    canvas = planted() if seed == 0 else random_canvas(seed)
    # jitter: odd frames' encoder readings off the pixel grid, so the resampling touch test decides those pairs
    frames = [(c, f, p + (jitter_mm if f % 2 else 0.0), m) for c, f, p, m in frames_of(canvas, line, mm_per_px)]
    expected = built(line, frames)
    assert merged_records(columns_of(line, frames), default_gap_mm(line)) == expected
    assert merged_records(columns_of(line, frames), 1.5) == records_with_gap(line, frames, 1.5)


def records_with_gap(line, frames, gap_mm: float) -> list:
    builder = RecordBuilder(line, gap_mm=gap_mm)
    for camera, frame_id, position, masks in frames:
        builder.add_frame("C1", camera, frame_id, position, masks)
    return builder.records("C1")


def test_no_components_no_records() -> None:
    assert merged_records(ComponentColumns.from_rows("C1", []), 0.5) == []


def test_the_pixel_grid_touch_test_is_the_resampling_one() -> None:
    rng = np.random.default_rng(1)

    def component(frame: int, along: float, across: float, mask: np.ndarray, px: float) -> Component:
        return Component(FrameKey("C", "cam", frame), 1, mask, along, across, px, px, int(mask.sum()), 0.0, None)

    touching = 0
    for trial in range(3000):
        px = (1.0, 0.5, 0.25)[trial % 3]
        gap = (px / 2, 0.0, 1.5 * px, 2 * px)[trial % 4]
        a = component(0, 100.0 + int(rng.integers(3)) * px, 50.0 * px, rng.random(rng.integers(1, 7, 2)) > 0.4, px)
        b = component(1, 100.0 + int(rng.integers(-8, 10)) * px, (50 + int(rng.integers(-8, 10))) * px,
                      rng.random(rng.integers(1, 7, 2)) > 0.4, px)
        reach = int(np.floor(gap / px + 1e-6)) + 1
        fast = pixels_touch(a, b, gap)  # both on one grid of square pixels: no resampling
        assert fast == (boxes_meet(a, b, gap) and touch_resampled(a, b, px, reach)), trial
        touching += fast
    assert 300 < touching < 2700  # both answers were exercised


@pytest.mark.parametrize("seed", range(4))
def test_the_box_index_gives_every_meeting_pair_once_in_any_batches(seed: int) -> None:
    """Against every pair compared: small cells, so boxes reach into several and pairs share more than one."""
    rng = np.random.default_rng(seed)
    count, gap = 400, (0.0, 0.5, 2.0, 0.25)[seed]
    along = np.round(rng.uniform(0, 300, count), 1)
    across = np.round(rng.uniform(0, 200, count), 1)
    boxes = Boxes(along, along + rng.uniform(0.5, 40, count), across, across + rng.uniform(0.5, 30, count),
                  rng.integers(1, 3, count), rng.integers(0, 40, count), np.arange(count))
    index = BoxIndex(gap)
    index.CELL_MM, index.CHUNK = 8.0, 50  # many cells per box, many chunks
    order = rng.permutation(count)  # boxes in any order, batches of any size
    cuts = np.sort(rng.choice(np.arange(1, count), 12, replace=False))
    found: list[tuple[int, int]] = []
    for batch in np.split(order, cuts):
        earlier, later = index.add(boxes.take(batch))
        assert (np.isin(earlier, batch) | np.isin(later, batch)).all()  # every pair has a new box
        found += zip(earlier.tolist(), later.tolist())
    assert len(found) == len(set(found))  # once each
    expected = {(a, b) for a in range(count) for b in range(a + 1, count)
                if boxes.classes[a] == boxes.classes[b] and boxes.frames[a] != boxes.frames[b]
                and _meet(boxes, a, b, gap)}
    assert expected <= set(found) and len(expected) > 50


def _meet(boxes: Boxes, a: int, b: int, gap: float) -> bool:
    slack = gap + 1e-6
    return bool(boxes.along_start[a] <= boxes.along_end[b] + slack and boxes.along_start[b] <= boxes.along_end[a] + slack
                and boxes.across_start[a] <= boxes.across_end[b] + slack
                and boxes.across_start[b] <= boxes.across_end[a] + slack)


@pytest.mark.parametrize("seed", range(3))
def test_frames_added_together_in_any_batches_are_the_records_of_one_at_a_time(seed: int) -> None:
    """The line watch adds a call's frames at once (RecordBuilder.add_frames): dense random defects, frames in any
    order and batches, four lanes wide enough that the index's cells split them, give the close's records."""
    rng = np.random.default_rng(seed)
    line = two_cameras(mm_per_px=8.0)  # 54 px across = 432 mm: the index's cells of 128 mm split the strip
    canvas = random_canvas(seed, defects=80)
    frames = frames_of(canvas, line, 8.0)
    expected = merged_records(columns_of(line, frames), default_gap_mm(line))
    builder = RecordBuilder(line)
    order = rng.permutation(len(frames)).tolist()
    while order:
        size = int(rng.integers(1, 6))
        batch, order = order[:size], order[size:]
        parts = []
        for i in batch:
            camera, frame_id, position, masks = frames[i]
            key = FrameKey("C1", camera, frame_id)
            parts.append((key, masks_components(line, key, position, masks)))
        assert builder.add_frames(parts + parts[:1]) == [True] * len(parts) + [False]  # a resent frame: nothing
    assert builder.records("C1") == expected
    assert len(expected) >= 30 and sum(len(r.frames) > 2 for r in expected) >= 10
