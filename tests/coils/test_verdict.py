"""A coil's verdict in the store: its periodic defects (and grade, with a grader) are kept at close,
returned for a closed coil as stored and judged on read for an open one."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from coils.line import Roll
from coils.records import DefectRecord, FrameKey, masks_components
from coils.store import CoilStore, FrameComponents
from tests.coils.test_records import ALONG, STRIP, frames_of, two_cameras
from tests.coils.test_store import store_url  # noqa: F401  (the SQLite and PostgreSQL stores)

PERIOD = 100.0  # mm: the roll's circumference; 1 mm per pixel


def roll_mark_frames(line, coil_id: str = "R1", marks: bool = True, random: int = 20) -> list[FrameComponents]:
    """60 frames: a 3x3 mark every 100 mm at one across place (12 turns), and ``random`` random pits of class 2."""
    canvas = np.zeros((2, 60 * ALONG, STRIP), np.uint8)
    for top in range(7, canvas.shape[1] - 3, int(PERIOD)) if marks else ():
        canvas[0, top:top + 3, 10:13] = 1
    rng = np.random.default_rng(1)
    for _ in range(random):
        top, left = int(rng.integers(0, canvas.shape[1] - 2)), int(rng.integers(0, STRIP - 2))
        canvas[1, top:top + 2, left:left + 2] = 1
    frames = []
    for camera, frame_id, position, masks in frames_of(canvas, line):
        key = FrameKey(coil_id, camera, frame_id)
        frames.append(FrameComponents(key, position, tuple(masks_components(line, key, position, masks)),
                                      1000.0 + frame_id))
    return frames


def grade_by_periodic(summary, records: list[DefectRecord], periodic) -> tuple[str, str]:
    return ("C", "C: periodic defects") if periodic else ("A", "A: default")


def test_periodic_defects_and_grade_are_kept_at_close_and_judged_on_read_while_open(store_url) -> None:  # noqa: F811
    line = dataclasses.replace(two_cameras(), rolls=(Roll("work-roll", PERIOD / math.pi),))
    store = CoilStore.open(store_url, line)
    store.grader = grade_by_periodic
    try:
        frames = roll_mark_frames(line)
        store.write_frames(frames[: len(frames) // 2])
        summary, records = store.get_coil("R1")
        open_verdict = store.verdict(summary, records)
        assert summary.state == "open" and open_verdict.grade == "C"
        assert [p.roll for p in open_verdict.periodic] == ["work-roll"]
        store.write_frames(frames)
        store.close_coil("R1", None, "end")
        store.grader = None  # a closed coil's verdict is the stored one, whatever the grader now
        summary, records = store.get_coil("R1")
        verdict = store.verdict(summary, records)
        assert (verdict.grade, verdict.grade_rule) == ("C", "C: periodic defects")
        [mark] = verdict.periodic
        assert mark.count == 12 and mark.class_id == 1 and mark.roll == "work-roll"
        assert abs(mark.period_mm - PERIOD) < 0.01 * PERIOD
        assert all(records[i].class_id == 1 and records[i].across_start_mm == 10 for i in mark.records)
    finally:
        store.close()
