"""The server's per-camera drift monitor (server/drift_monitor.py): windows, hysteresis, the camera
bound and its rate-limited log, on statistics of synthetic strips."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from engine import drift
from server.drift_monitor import DriftMonitor
from tests.engine.test_drift import H, W, defect_counts, strips


@pytest.fixture(scope="module")
def reference() -> drift.DriftReference:
    return drift.build_reference((strips(50, seed=i) for i in range(8)), defect_counts(400, seed=99))


def test_unshifted_frames_score_low_and_a_brightness_shift_crosses(reference, caplog):
    monitor = DriftMonitor(reference, window=300, min_fill=200)
    crossings = {"steady": [], "shifted": []}
    caplog.set_level(logging.INFO, logger="server.drift_monitor")
    for i in range(15):  # 300 frames per camera, in batches of 20
        crossings["steady"] += monitor.observe("steady", strips(20, seed=1000 + i), defect_counts(20, seed=2000 + i))
        crossings["shifted"] += monitor.observe(
            "shifted", strips(20, seed=3000 + i, shift=15.0), defect_counts(20, seed=4000 + i)
        )
    steady, shifted = monitor.scores("steady"), monitor.scores("shifted")
    for name in reference.names:
        assert steady[name]["psi"] < monitor.psi_threshold, (name, steady[name])
        assert steady[name]["ks"] is None or steady[name]["ks"] < monitor.ks_threshold, (name, steady[name])
    assert crossings["steady"] == []
    assert shifted["brightness"]["psi"] > monitor.psi_threshold
    assert shifted["brightness"]["ks"] > monitor.ks_threshold
    # Reported once when the window first crossed, not on every later batch.
    assert sorted((c.statistic, c.score) for c in crossings["shifted"]) == [("brightness", "ks"), ("brightness", "psi")]
    assert all(c.crossed and c.camera_id == "shifted" for c in crossings["shifted"])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("'shifted': brightness" in r.getMessage() for r in warnings)
    status = monitor.status()
    assert status["shifted"].over == (("brightness", "ks"), ("brightness", "psi"))
    assert status["steady"].over == () and status["steady"].frames_seen == 300

    # The line returns to normal: once the window holds normal frames the scores recover, once.
    back = []
    for i in range(15):
        back += monitor.observe("shifted", strips(20, seed=5000 + i), defect_counts(20, seed=6000 + i))
    assert sorted((c.statistic, c.score, c.crossed) for c in back) == [
        ("brightness", "ks", False), ("brightness", "psi", False)
    ]
    assert monitor.status()["shifted"].over == ()


def synthetic_line(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` frames of ``trainer.synth`` (a quarter with one defect) and their masks' pixel counts."""
    from trainer.synth import draw_frame

    rng = np.random.default_rng(seed)
    frames, counts = [], []
    for i in range(n):
        classes = (int(rng.integers(4)),) if rng.random() < 0.25 else ()
        frame, masks = draw_frame(np.random.default_rng([seed, i]), H, W, classes, 4)
        frames.append(frame)
        counts.append(masks.reshape(4, -1).sum(axis=1))
    return np.stack(frames), np.stack(counts)


def test_brightness_shift_of_synthetic_line_frames_crosses_the_threshold():
    reference_frames, reference_counts = synthetic_line(300, seed=1)
    reference = drift.build_reference([reference_frames], reference_counts)
    frames, counts = synthetic_line(200, seed=2)
    brighter = np.clip(frames.astype(np.int16) + 20, 0, 255).astype(np.uint8)  # a lamp change
    monitor = DriftMonitor(reference, window=200, min_fill=200)
    assert monitor.observe_batch(["steady"] * 200, frames, counts) == []
    crossed = monitor.observe_batch(["brighter"] * 200, brighter, counts)
    steady = monitor.scores("steady")
    assert max(v["psi"] for v in steady.values()) < monitor.psi_threshold, steady
    assert max(v["ks"] or 0.0 for v in steady.values()) < monitor.ks_threshold, steady
    assert {("brightness", "psi"), ("brightness", "ks")} <= {(c.statistic, c.score) for c in crossed}
    # The same defects were predicted on both cameras: their area statistics cannot have drifted.
    assert monitor.scores("brighter")["area_class_3"] == steady["area_class_3"]


def test_no_scores_before_the_minimum_fill(reference):
    monitor = DriftMonitor(reference, window=100, min_fill=50)
    monitor.observe("cam", strips(49, seed=1), defect_counts(49, seed=1))
    assert monitor.scores("cam") is None and monitor.status()["cam"].scores is None
    assert monitor.scores("never-seen") is None
    monitor.observe("cam", strips(1, seed=2), defect_counts(1, seed=2))
    assert monitor.scores("cam") is not None


def test_window_keeps_only_the_newest_rows(reference):
    monitor = DriftMonitor(reference, window=40, min_fill=40)
    old = drift.line_stats(strips(40, seed=1, shift=60), defect_counts(40, seed=1), 4)
    new = drift.line_stats(strips(40, seed=2), defect_counts(40, seed=2), 4)
    monitor.update("cam", old)
    monitor.update("cam", new[:25])
    monitor.update("cam", new[25:])
    assert monitor.scores("cam") == drift.drift_scores(reference, new)
    assert monitor.status()["cam"].frames_seen == 80 and monitor.status()["cam"].window_fill == 40


def test_batch_of_several_cameras_goes_to_each_cameras_window(reference):
    frames = np.concatenate([strips(60, seed=1), strips(60, seed=2, shift=40)])
    counts = defect_counts(120, seed=3)
    order = np.random.default_rng(0).permutation(120)
    cameras = np.where(order < 60, "a", "b").tolist()
    monitor = DriftMonitor(reference, window=60, min_fill=60)
    monitor.observe_batch(cameras, frames[order], counts[order])
    rows = reference.line_stats(frames, counts)
    assert monitor.scores("a") == drift.drift_scores(reference, rows[:60])
    assert monitor.scores("b") == drift.drift_scores(reference, rows[60:])
    with pytest.raises(ValueError, match="3 camera ids for 120"):
        monitor.observe_batch(["a", "b", "c"], frames, counts)


def test_thresholds_are_settable_and_validated(reference):
    monitor = DriftMonitor(reference, window=200, min_fill=200)
    rows = reference.line_stats(strips(200, seed=7, shift=1.0), defect_counts(200, seed=7))
    assert monitor.update("cam", rows) == []
    psi = monitor.scores("cam")["brightness"]["psi"]
    monitor.set_thresholds(psi=psi / 2)
    crossings = monitor.update("cam", rows[:1])
    assert any(c.statistic == "brightness" and c.score == "psi" and c.threshold == psi / 2 for c in crossings)
    with pytest.raises(ValueError, match=r"drift_psi_threshold \(--drift-psi-threshold\) must be a positive number"):
        monitor.set_thresholds(psi=0)
    with pytest.raises(ValueError, match=r"drift_min_frames \(--drift-min-frames\) must lie in 1..drift_window \(10\)"):
        DriftMonitor(reference, window=10, min_fill=20)
    with pytest.raises(ValueError, match=r"shape \[N, 8\]"):
        monitor.update("cam", rows[:, :4])


def test_camera_count_is_bounded(reference, caplog):
    monitor = DriftMonitor(reference, window=10, min_fill=10, max_cameras=2)
    rows = reference.line_stats(strips(1, seed=0), defect_counts(1, seed=0))
    for camera in ("a", "b", "a", "c"):
        monitor.update(camera, rows)
    assert sorted(monitor.status()) == ["a", "c"]  # b was the least recently seen
    assert "dropped 'b'" in caplog.text and monitor.evicted == 1


def test_evictions_are_logged_at_most_once_per_interval(reference, caplog):
    # 5,000 camera ids through a 2-camera monitor: one warning line (counting the evictions), not 4,998.
    monitor = DriftMonitor(reference, window=10, min_fill=10, max_cameras=2)
    rows = reference.line_stats(strips(1, seed=0), defect_counts(1, seed=0))
    caplog.set_level(logging.WARNING, logger="server.drift_monitor")
    for i in range(5000):
        monitor.update(f"camera-{i}", rows)
    evictions = [r for r in caplog.records if "drift_camera_evicted" in r.getMessage()]
    assert monitor.evicted == 4998 and monitor.cameras == 2
    assert len(evictions) == 1 and "evicted=1 " in evictions[0].getMessage()


def test_a_long_camera_id_is_cut_short_in_the_log(reference, caplog):
    monitor = DriftMonitor(reference, window=10, min_fill=10, max_cameras=1)
    rows = reference.line_stats(strips(1, seed=0), defect_counts(1, seed=0))
    caplog.set_level(logging.WARNING, logger="server.drift_monitor")
    monitor.update("x" * 100_000, rows)
    monitor.update("y", rows)
    assert "(100000 characters)" in caplog.text and len(caplog.text) < 2000
