"""Capture policy and the asynchronous capture writer (server/capture.py), on real folders in tmp_path."""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import rle
from server import capture_folder, config
from server.capture import CapturePolicy, CaptureWriter
from trainer.data import DataConfig, load_samples, read_annotations, read_image

H, W = 64, 320
MIN_AREAS = (200, 200, 300, 400)
CFG = DataConfig(num_classes=4, height=H, width=W)


def frame_and_prediction(seed: int) -> dict:
    """A grey frame and a prediction: class 1 present (240 px), class 3 below its minimum area (150 px)."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(60, 200, (H, W), dtype=np.uint8)
    masks = np.zeros((4, H, W), np.uint8)
    masks[0, 10:22, 20:40] = 1  # 240 px >= 200: present
    masks[2, 30:45, 100:110] = 1  # 150 px < 300: not present, but near its minimum area
    counts = masks.reshape(4, -1).sum(1)
    return {
        "frame": frame,
        "rles": [rle.encode(m) for m in masks],
        "counts": counts,
        "present": counts >= np.array(MIN_AREAS),
    }


def offer(writer: CaptureWriter, seed: int, frame=None, **kw) -> bool:
    p = frame_and_prediction(seed)
    args = dict(camera_id="cam-1", frame_id=seed, time_ns=1_700_000_000_000_000_000 + seed, model_version="m1",
                rles=p["rles"], counts=p["counts"], present=p["present"])
    args.update(kw)
    return writer.offer(p["frame"] if frame is None else frame, **args)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


# --------------------------------------------------------------------------- policy


def test_policy_parsing():
    assert CapturePolicy.parse("uncertain,defects,sample:0.01") == CapturePolicy(True, True, 0.01)
    assert CapturePolicy.parse(" defects ") == CapturePolicy(defects=True)
    assert CapturePolicy.parse("sample:1", uncertain_band=(0.8, 1.5)) == CapturePolicy(sample=1.0, uncertain_band=(0.8, 1.5))
    assert str(CapturePolicy.parse("sample:0.5,uncertain")) == "uncertain,sample:0.5"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "capture policy is empty"),
        ("defects,blurry", "unknown token 'blurry'"),
        ("defects,defects", "token 'defects' repeats"),
        ("sample", "unknown token 'sample'"),
        ("sample:2", "token 'sample:2' needs a share"),
        ("sample:abc", "token 'sample:abc' needs a share"),
        ("uncertain:3", "unknown token 'uncertain:3'"),
    ],
)
def test_policy_errors_name_the_token(text, message):
    with pytest.raises(ValueError, match=message):
        CapturePolicy.parse(text)


def test_policy_band_is_validated():
    with pytest.raises(ValueError, match="0 <= LO <= 1 <= HI"):
        CapturePolicy.parse("uncertain", uncertain_band=(1.5, 2.0))


def test_uncertain_band_and_defects_rules():
    policy = CapturePolicy(uncertain=True, defects=True)
    # Class 1: min area 200, band [100, 400]: 99 and 401 are outside, 0 is never uncertain.
    # Class 2: min area 1000, band [500, 2000]: 600 is uncertain and not present.
    counts = np.array([[99, 0], [100, 0], [400, 0], [401, 0], [0, 0], [0, 600]])
    present = counts >= np.array([200, 1000])
    reasons = policy.reasons(counts, present, [200, 1000], np.random.default_rng(0))
    assert reasons == ["", "uncertain:1", "uncertain:1+defects", "defects", "", "uncertain:2"]
    assert CapturePolicy(defects=True).reasons(counts, present, [200, 1000], np.random.default_rng(0)) == [
        "", "", "defects", "defects", "", ""
    ]
    with pytest.raises(ValueError, match=r"one column per class"):
        policy.reasons(counts, present, [200], np.random.default_rng(0))


def test_sample_share_is_seeded():
    policy = CapturePolicy(sample=0.1)
    counts = np.zeros((5000, 4), int)
    first = policy.reasons(counts, counts > 0, MIN_AREAS, np.random.default_rng(7))
    again = policy.reasons(counts, counts > 0, MIN_AREAS, np.random.default_rng(7))
    assert first == again
    share = sum(r == "sample" for r in first) / 5000
    assert 0.08 < share < 0.12  # binomial(5000, 0.1): sd 0.0042, so this is a 4.7 sigma band


# --------------------------------------------------------------------------- writer


def test_captured_folder_loads_as_training_data(tmp_path):
    out = tmp_path / "captures"
    jpeg = cv2.imencode(".jpg", frame_and_prediction(5)["frame"])[1].tobytes()
    with CaptureWriter(out, CapturePolicy(uncertain=True), MIN_AREAS, quota_bytes=10**9) as writer:
        assert offer(writer, 1)  # raw frame -> PNG
        assert offer(writer, 2, frame=np.repeat(frame_and_prediction(2)["frame"][:, :, None], 3, axis=2))  # BGR
        assert offer(writer, 5, frame=memoryview(jpeg), camera_id="cam/2 west")  # original bytes, unsafe camera id
        nothing = frame_and_prediction(9)
        assert not writer.offer(nothing["frame"], camera_id="cam-1", frame_id=9, time_ns=0, model_version="m1",
                                rles=[""] * 4, counts=[0] * 4, present=[False] * 4)
    assert writer.counters()["written"] == 3 and writer.offered == 4 and writer.selected == 3
    assert writer.skipped == 0

    samples = load_samples(out, CFG)
    by_id = {s.image_id: s for s in samples}
    assert sorted(by_id) == [
        "cam-1_000000000001_1700000000000000001.png",
        "cam-1_000000000002_1700000000000000002.png",
        "cam_2_west_000000000005_1700000000000000005.jpg",
    ]
    expected = frame_and_prediction(1)
    raw = by_id["cam-1_000000000001_1700000000000000001.png"]
    # train.csv holds the model's labels: class 1 (present); class 3 was below its minimum area.
    assert raw.rles == (expected["rles"][0], "", "", "")
    np.testing.assert_array_equal(read_image(raw.path, CFG), expected["frame"])  # lossless
    assert (out / "train_images" / "cam_2_west_000000000005_1700000000000000005.jpg").read_bytes() == jpeg
    np.testing.assert_array_equal(
        read_image(by_id["cam-1_000000000002_1700000000000000002.png"].path, CFG), frame_and_prediction(2)["frame"]
    )

    # predictions.csv: every non-empty mask, including the near miss of class 3.
    predictions = read_annotations(out / "predictions.csv", 4, H, W)
    assert predictions["cam-1_000000000001_1700000000000000001.png"] == [
        expected["rles"][0], "", expected["rles"][2], ""
    ]
    rows = read_csv(out / "captures.csv")
    assert rows[0] == list(capture_folder.CAPTURES_HEADER)
    assert rows[1] == [
        "cam-1_000000000001_1700000000000000001.png", "cam-1", "1", "1700000000000000001", "m1",
        "uncertain:1,3", "240 0 150 0", "1",  # 240 px is within 0.5..2 x 200 as well
    ]
    assert rows[3][1] == "cam/2 west"


def test_quota_is_honoured_within_a_run_and_across_restarts(tmp_path):
    out = tmp_path / "captures"
    jpeg = cv2.imencode(".jpg", frame_and_prediction(0)["frame"])[1].tobytes()
    quota = 3 * len(jpeg) + 3000  # three captures plus their CSV rows (~500 B each) and headers, not four
    policy = CapturePolicy(defects=True)
    with CaptureWriter(out, policy, MIN_AREAS, quota_bytes=quota) as writer:
        for i in range(8):
            offer(writer, i, frame=jpeg)
    assert writer.written == 3 and writer.skipped_quota == 5
    used = capture_folder.folder_bytes(out)
    assert used <= quota and writer.bytes_used == used

    # A restart counts what is already there: the same quota admits nothing more.
    with CaptureWriter(out, policy, MIN_AREAS, quota_bytes=quota) as writer:
        writer_started = writer
        for i in range(8, 12):
            offer(writer, i, frame=jpeg)
    assert writer_started.written == 0 and writer_started.skipped_quota == 4
    assert capture_folder.folder_bytes(out) == used
    # A larger quota takes more, and the folder still loads.
    with CaptureWriter(out, policy, MIN_AREAS, quota_bytes=quota + len(jpeg) + 1000) as writer:
        offer(writer, 20, frame=jpeg)
        offer(writer, 21, frame=jpeg)
    assert writer.written == 1 and writer.skipped_quota == 1
    assert len(load_samples(out, CFG)) == 4


def test_full_queue_skips_without_blocking(tmp_path):
    writer = CaptureWriter(tmp_path / "c", CapturePolicy(defects=True), MIN_AREAS, quota_bytes=10**9,
                           queue_size=2, start=False)
    results = [offer(writer, i) for i in range(5)]
    assert results == [True, True, False, False, False]
    assert writer.skipped_queue_full == 3
    writer.start()
    writer.close()
    assert writer.written == 2 and len(load_samples(tmp_path / "c", CFG)) == 2


def test_unusable_folder_skips_every_capture(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the capture folder should be")
    writer = CaptureWriter(blocker, CapturePolicy(defects=True), MIN_AREAS, quota_bytes=10**9, queue_size=100)
    results = [offer(writer, i) for i in range(50)]
    writer.close()
    assert writer.written == 0
    # Whether an offer was queued before the writer found the folder unusable (True) or skipped
    # at once afterwards (False), every one is counted as skipped.
    assert len(results) == 50 and writer.skipped_error == 50 and writer.skipped == 50
    assert blocker.read_text() == "a file where the capture folder should be"


def test_disk_failure_mid_run_is_counted_and_recovers(tmp_path):
    out = tmp_path / "c"
    writer = CaptureWriter(out, CapturePolicy(defects=True), MIN_AREAS, quota_bytes=10**9, retry_seconds=0.0,
                           start=False)
    writer.start()
    offer(writer, 1)
    _drain(writer)
    assert writer.written == 1
    images = out / "train_images"
    saved = {p.name: p.read_bytes() for p in images.iterdir()}
    for p in images.iterdir():
        p.unlink()
    images.rmdir()
    images.write_text("the disk went away")  # writes into train_images/ now fail
    for i in range(2, 6):
        offer(writer, i)
    _drain(writer)
    assert writer.written == 1 and writer.skipped_error == 4
    images.unlink()  # the disk is back
    images.mkdir()
    for name, data in saved.items():
        (images / name).write_bytes(data)
    offer(writer, 7)
    writer.close()
    assert writer.written == 2
    # The failed captures left no rows behind: the folder loads with exactly the two saved frames.
    assert [s.image_id for s in load_samples(out, CFG)] == [
        "cam-1_000000000001_1700000000000000001.png", "cam-1_000000000007_1700000000000000007.png"
    ]


def _drain(writer: CaptureWriter) -> None:
    """Waits until the writer thread has taken every queued capture (and finished writing it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        c = writer.counters()
        if c["queued"] == 0 and c["written"] + c["skipped"] == c["selected"]:
            return
        time.sleep(0.01)
    raise AssertionError(f"capture writer did not drain: {writer.counters()}")


def test_restart_repairs_what_a_crash_left(tmp_path):
    out = tmp_path / "c"
    with CaptureWriter(out, CapturePolicy(defects=True), MIN_AREAS, quota_bytes=10**9) as writer:
        offer(writer, 1)
    # A crash after the rows were appended but before the image was renamed into place, and one
    # in the middle of writing a row.
    (out / "train_images" / ".cam-1_lost.png.tmp").write_bytes(b"partial")
    for name in ("train.csv", "predictions.csv"):
        with open(out / name, "a") as f:
            f.write("cam-1_lost.png,1,1 5\ncam-1_half")
    with open(out / "captures.csv", "a") as f:
        f.write("cam-1_lost.png,cam-1,9,0,m1,defects,5 0 0 0,1\n")
    with pytest.raises(ValueError, match=r"train.csv:4: expected 3 fields"):  # the trainer refuses it as is
        load_samples(out, CFG)
    with CaptureWriter(out, CapturePolicy(defects=True), MIN_AREAS, quota_bytes=10**9) as writer:
        offer(writer, 2)
    assert [s.image_id for s in load_samples(out, CFG)] == [
        "cam-1_000000000001_1700000000000000001.png", "cam-1_000000000002_1700000000000000002.png"
    ]
    assert not list((out / "train_images").glob(".*"))
    assert [r[0] for r in read_csv(out / "captures.csv")][1:] == [
        "cam-1_000000000001_1700000000000000001.png", "cam-1_000000000002_1700000000000000002.png"
    ]


def test_foreign_csv_in_the_folder_is_reported(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "train.csv").write_text("ImageId_ClassId,EncodedPixels\n")
    with CaptureWriter(out, CapturePolicy(defects=True), MIN_AREAS, quota_bytes=10**9, queue_size=10) as writer:
        offer(writer, 1)
    assert writer.written == 0 and writer.skipped_error == 1


def test_same_frame_twice_is_never_overwritten(tmp_path):
    with CaptureWriter(tmp_path, CapturePolicy(defects=True), MIN_AREAS, quota_bytes=10**9) as writer:
        offer(writer, 1, image_id="frame")
        offer(writer, 1, image_id="frame")
    assert sorted(p.name for p in (tmp_path / "train_images").iterdir()) == ["frame-2.png", "frame.png"]


def test_bad_frames_are_skipped_not_raised(tmp_path, caplog):
    with CaptureWriter(tmp_path, CapturePolicy(defects=True), MIN_AREAS, quota_bytes=10**9) as writer:
        assert not offer(writer, 1, frame=b"GIF89a...")
        assert not offer(writer, 2, frame=np.zeros((H, W), np.float32))
    assert writer.skipped_error == 2 and writer.written == 0
    assert "frame 1 of camera 'cam-1': bytes are neither JPEG nor PNG" in caplog.text
    with pytest.raises(ValueError, match=r"one entry per class \(4\)"):
        offer(writer, 3, rles=["", ""])


def test_batch_selection_then_offer(tmp_path):
    preds = [frame_and_prediction(i) for i in range(3)]
    counts = np.stack([p["counts"] for p in preds])
    present = np.stack([p["present"] for p in preds])
    present[1] = False
    with CaptureWriter(tmp_path, CapturePolicy(defects=True), MIN_AREAS, quota_bytes=10**9) as writer:
        reasons = writer.select(counts, present)
        assert reasons == ["defects", "", "defects"]
        for i, reason in enumerate(reasons):
            if reason:
                writer.offer(preds[i]["frame"], camera_id="c", frame_id=i, time_ns=0, model_version="m", rles=preds[i]["rles"],
                             counts=counts[i], present=present[i], reason=reason)
    assert writer.written == 2


# --------------------------------------------------------------------------- command line


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_capture_arguments(parser)
    return parser.parse_args(argv)


def writer_from_args(args: argparse.Namespace, min_areas):
    capture_config = config.capture_from_args(args)
    return None if capture_config is None else CaptureWriter.from_config(capture_config, min_areas)


def test_flags_build_the_writer(tmp_path):
    assert writer_from_args(_parse([]), MIN_AREAS) is None
    writer = writer_from_args(
        _parse(["--capture-dir", str(tmp_path), "--capture", "defects,sample:0.5", "--capture-quota-gb", "0.5",
                "--capture-uncertain-band", "0.8,1.25", "--capture-queue", "8"]),
        MIN_AREAS,
    )
    try:
        assert writer.policy == CapturePolicy(defects=True, sample=0.5, uncertain_band=(0.8, 1.25))
        assert writer.quota_bytes == 500_000_000 and writer.queue_size == 8
    finally:
        writer.close()
    default = writer_from_args(_parse(["--capture-dir", str(tmp_path)]), MIN_AREAS)
    default.close()
    assert default.policy == CapturePolicy.parse(config.DEFAULT_CAPTURE_POLICY)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--capture", "defects"], "--capture needs --capture-dir"),
        (["--capture-dir", "x", "--capture", "defects,glare"], "unknown token 'glare'"),
        (["--capture-dir", "x", "--capture-quota-gb", "0"], r"capture quota \(--capture-quota-gb\) must be a positive"),
        (["--capture-dir", "x", "--capture-queue", "0"], r"capture queue size \(--capture-queue\) must be >= 1"),
    ],
)
def test_bad_flags_are_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        writer_from_args(_parse(argv), MIN_AREAS)
