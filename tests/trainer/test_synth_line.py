"""``trainer synth-line``: the planted truth, pushed through the record builder with the true masks,
comes back exactly, one record per planted defect; the cameras see one strip; the CLI."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from coils.line import Line, load_line
from coils.line_folder import LineFrame, TruthDefect, read_frames, read_masks, read_truth
from coils.records import DefectRecord, RecordBuilder
from engine import rle
from trainer.cli import main as trainer_main
from trainer.synth_line import LineSpec, synthesize_line

SPEC = LineSpec(cameras=3, frames=14, coils=2, height=64, width=320, overlap_px=32, mm_per_px=0.5, seed=4,
                image_format="png")


@pytest.fixture(scope="module")
def line_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("line")
    synthesize_line(out, SPEC)
    return out


def frame_masks(line: Line, frame: LineFrame, masks: dict) -> np.ndarray:
    camera = line.camera(frame.camera_id)
    shape = (4, camera.frame_height_px, camera.frame_width_px)
    stack = np.zeros(shape, np.uint8)
    for class_id, encoded in masks.get((frame.camera_id, frame.frame_id), {}).items():
        stack[class_id - 1] = rle.decode(encoded, *shape[1:])
    return stack


def true_records(folder: Path) -> dict[str, list[DefectRecord]]:
    """The line folder's true masks through the record builder, frame by frame as listed."""
    line = load_line(folder / "line.yaml")
    builder = RecordBuilder(line)
    masks = read_masks(folder)
    for frame in read_frames(folder):
        builder.add_frame(frame.coil_id, frame.camera_id, frame.frame_id, frame.position_mm,
                          frame_masks(line, frame, masks))
    return {coil: builder.records(coil) for coil in builder.coils()}


def matches(record: DefectRecord, truth: TruthDefect, pixel_mm: float) -> bool:
    """The same class and place, within one pixel's size along and across, and the same area."""
    return (record.coil_id == truth.coil_id and record.class_id == truth.class_id
            and all(abs(a - b) <= pixel_mm for a, b in (
                (record.along_start_mm, truth.along_start_mm), (record.along_end_mm, truth.along_end_mm),
                (record.across_start_mm, truth.across_start_mm), (record.across_end_mm, truth.across_end_mm)))
            and math.isclose(record.area_mm2, truth.area_mm2))


def test_the_true_masks_give_one_record_per_planted_defect_at_its_place(line_folder: Path) -> None:
    truth = read_truth(line_folder)
    records = true_records(line_folder)
    assert sorted(records) == ["coil-4-000", "coil-4-001"]
    for coil, found in records.items():
        planted = [d for d in truth if d.coil_id == coil]
        assert len(found) == len(planted)
        pairs = [(r, next(d for d in planted if matches(r, d, SPEC.mm_per_px))) for r in found]
        assert len({id(d) for _, d in pairs}) == len(planted)  # each planted defect matched exactly once
        frame_mm = SPEC.height * SPEC.mm_per_px
        for record, defect in pairs:
            frames_along = {f for _, f in record.frames}
            if defect.kind in ("boundary", "both"):
                assert len(frames_along) >= 2, record
            if defect.kind in ("lane", "both"):
                assert len(record.cameras) == 2, record
            if defect.kind == "long":
                assert len(frames_along) >= 5 and record.length_mm > 4 * frame_mm
        kinds = Counter(d.kind for d in planted)
        assert kinds["boundary"] == 2 and kinds["lane"] == 2 and kinds["both"] == 1 and kinds["long"] == 1


def test_roll_marks_repeat_at_the_rolls_circumference(line_folder: Path) -> None:
    roll = load_line(line_folder / "line.yaml").rolls[0]
    for coil in ("coil-4-000", "coil-4-001"):
        marks = sorted((d for d in read_truth(line_folder) if d.coil_id == coil and d.kind == "roll_mark"),
                       key=lambda d: d.along_start_mm)
        assert len(marks) >= 2 and {m.roll for m in marks} == {roll.name}
        assert len({(m.across_start_mm, m.area_mm2) for m in marks}) == 1  # one imprint, one column
        starts = np.array([m.along_start_mm for m in marks])
        expected = starts[0] + np.arange(len(marks)) * roll.circumference_mm
        assert np.abs(starts - expected).max() <= SPEC.mm_per_px  # rounded to whole pixels


def test_the_cameras_see_one_strip_at_the_encoder_positions(line_folder: Path) -> None:
    import cv2

    line = load_line(line_folder / "line.yaml")
    frames = read_frames(line_folder)
    assert len(frames) == SPEC.coils * SPEC.cameras * SPEC.frames
    masks = read_masks(line_folder)
    frame_mm = SPEC.height * SPEC.mm_per_px
    by_key = {(f.coil_id, f.camera_id, f.position_mm): f for f in frames}
    for frame in frames:
        assert frame.position_mm == (frame.frame_id % SPEC.frames) * frame_mm
        image = cv2.imread(str(line_folder / frame.file), cv2.IMREAD_UNCHANGED)
        assert image.shape == (SPEC.height, SPEC.width) and image.dtype == np.uint8
        if frame.camera_id == "cam0":  # the overlap: cam1's first 32 columns are cam0's last 32
            right = by_key[(frame.coil_id, "cam1", frame.position_mm)]
            left_masks, right_masks = frame_masks(line, frame, masks), frame_masks(line, right, masks)
            assert np.array_equal(left_masks[:, :, -SPEC.overlap_px:], right_masks[:, :, :SPEC.overlap_px])
    ids = [f.frame_id for f in frames if f.camera_id == "cam2"]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # each camera's frames in increasing order


def test_the_command_writes_a_folder_and_refuses_to_overwrite_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "line"
    argv = ["synth-line", "--out", str(out), "--cameras", "2", "--frames", "5", "--height", "64", "--width", "320",
            "--overlap-px", "16", "--seed", "1"]
    assert trainer_main(argv) == 0
    said = capsys.readouterr().out
    assert "1 coil(s) x 2 camera(s) x 5 frames of 64x320" in said and "both 1" in said
    assert (out / "cam0").is_dir() and (out / "truth.json").is_file()
    first = (out / "truth.csv").read_text()
    assert trainer_main(argv) == 2
    assert "already holds a line folder" in capsys.readouterr().err
    assert trainer_main([*argv, "--force"]) == 0
    assert (out / "truth.csv").read_text() == first  # deterministic by seed
    assert trainer_main(["synth-line", "--out", str(tmp_path / "x"), "--frames", "2"]) == 2
    assert "--frames must be >= 4" in capsys.readouterr().err
