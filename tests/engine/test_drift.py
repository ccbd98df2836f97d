"""Drift statistics, reference and scores (engine/drift.py); the per-camera monitor is tested in
tests/server/test_drift_monitor.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine import drift
from engine.metadata import ModelMetadata

H, W = 64, 320


def strips(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Grey steel-like strips: a per-frame base level, streaks along the rolling direction
    (constant per column), pixel noise, and in 30 % of frames a black edge; ``shift`` is a brightness change."""
    rng = np.random.default_rng(seed)
    base = rng.normal(110.0, 6.0, (n, 1, 1))
    streaks = rng.normal(0.0, 8.0, (n, 1, W))
    noise = rng.normal(0.0, 10.0, (n, H, W))
    frames = base + streaks + noise
    dark_edge = rng.random(n) < 0.3
    frames[dark_edge, :, :12] = 0.0
    # A lighting change lifts every pixel alike: contrast and (for shifts < DARK_LEVEL) the dark
    # edge stay as they were, so only brightness should drift.
    return np.clip(frames + shift, 0, 255).astype(np.uint8)


def defect_counts(n: int, seed: int, classes: int = 4) -> np.ndarray:
    """~86 % empty (image, class) pairs, like Severstal; the rest a few hundred to thousands of pixels."""
    rng = np.random.default_rng(seed)
    return (rng.integers(50, 3000, (n, classes)) * (rng.random((n, classes)) < 0.14)).astype(np.int32)


@pytest.fixture(scope="module")
def reference() -> drift.DriftReference:
    return drift.build_reference((strips(50, seed=i) for i in range(8)), defect_counts(400, seed=99))


# --------------------------------------------------------------------------- statistics


def test_frame_stats_match_float64_definitions():
    frames = np.concatenate([
        strips(5, seed=1),
        np.full((1, H, W), 77, np.uint8),  # constant: std exactly 0
        np.zeros((1, H, W), np.uint8),  # all dark
        np.full((1, H, W), 255, np.uint8),  # all saturated
        np.random.default_rng(2).integers(0, 256, (2, H, W), dtype=np.uint8),
    ])
    stats = drift.frame_stats(frames)
    assert stats.dtype == np.float32 and stats.shape == (10, len(drift.FRAME_STAT_NAMES))
    flat = frames.reshape(10, -1).astype(np.float64)
    # Integer sums, then double precision: only the float32 rounding of the result is left.
    np.testing.assert_allclose(stats[:, 0], flat.mean(1), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(stats[:, 1], flat.std(1), rtol=1e-6, atol=1e-5)
    # The ratios are exact counts divided by the pixel count (then rounded to float32).
    np.testing.assert_allclose(stats[:, 2], (flat <= drift.DARK_LEVEL).mean(1), rtol=1e-6)
    np.testing.assert_allclose(stats[:, 3], (flat >= drift.SATURATED_LEVEL).mean(1), rtol=1e-6)
    assert stats[5, 1] == 0.0 and stats[6, 2] == 1.0 and stats[7, 3] == 1.0


def test_frame_stats_of_a_strided_view_are_those_of_its_copy():
    frames = np.random.default_rng(3).integers(0, 256, (3, H, 2 * W), dtype=np.uint8)[:, ::2, 1::2]
    np.testing.assert_array_equal(drift.frame_stats(frames), drift.frame_stats(frames.copy()))


def test_frame_stats_reject_wrong_frames():
    with pytest.raises(ValueError, match="uint8 grayscale frames"):
        drift.frame_stats(np.zeros((2, H, W), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        drift.frame_stats(np.zeros((H, W), np.uint8))


def test_area_fractions_and_line_stats():
    counts = np.array([[0, 320, 0, 64 * 320]], np.int32)
    np.testing.assert_array_equal(drift.area_fractions(counts, H * W), [[0, 320 / (H * W), 0, 1]])
    with pytest.raises(ValueError, match="counts must lie in 0..20480"):
        drift.area_fractions(np.array([[H * W + 1]]), H * W)
    frames = strips(3, seed=0)
    rows = drift.line_stats(frames, defect_counts(3, seed=0), num_classes=4)
    assert rows.shape == (3, 8)
    with pytest.raises(ValueError, match="counts are needed"):
        drift.line_stats(frames, None, num_classes=4)
    with pytest.raises(ValueError, match=r"one row per frame"):
        drift.line_stats(frames, defect_counts(2, seed=0), num_classes=4)


# --------------------------------------------------------------------------- reference


def test_reference_round_trips_through_json_and_model_metadata(reference):
    assert reference.names == drift.FRAME_STAT_NAMES + drift.area_stat_names(4)
    assert reference.frames == 400 and reference.count_frames == 400
    data = json.loads(json.dumps(reference.to_dict()))
    assert drift.DriftReference.from_dict(data) == reference
    meta = ModelMetadata(drift_reference=reference.to_dict())
    back = ModelMetadata.from_onnx_props(meta.to_onnx_props())
    assert drift.DriftReference.from_dict(back.drift_reference) == reference


def test_reference_bins_are_quantiles_and_point_masses_get_their_own_bin(reference):
    brightness = reference["brightness"]
    # Quantile bins over a continuous statistic: 10 bins of about 10 % each.
    assert len(brightness.proportions) == drift.DEFAULT_BINS
    np.testing.assert_allclose(brightness.proportions, 0.1, atol=0.02)
    assert brightness.ks_applies
    # ~86 % of area values are exactly 0: the first bin is (-inf, 0] and holds exactly them.
    area = reference["area_class_1"]
    counts = defect_counts(400, seed=99)[:, 0]
    assert area.edges[0] == 0.0
    zero_share = (counts == 0).sum()
    assert area.proportions[0] == pytest.approx((zero_share + 0.5) / (400 + 0.5 * len(area.proportions)))
    assert not area.ks_applies  # a CDF with a jump that size is not described by quantiles
    assert abs(sum(area.proportions) - 1) < 1e-9


def test_reference_without_counts_has_frame_statistics_only():
    ref = drift.build_reference([strips(30, seed=1)])
    assert ref.names == drift.FRAME_STAT_NAMES and ref.num_classes == 0
    assert ref.line_stats(strips(2, seed=2), None).shape == (2, 4)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other/1"), "format"),
        (lambda d: d["stats"][0].update(proportions=[0.5, 0.5]), "brightness: 2 proportions"),
        (lambda d: d["stats"][1].update(edges=[3.0, 2.0]), "contrast: edges must be"),
        (lambda d: d.update(dark_level=20), "re-export the model"),
        (lambda d: d.pop("stats"), "lacks the key 'stats'"),
        (lambda d: d["stats"].pop(0), "must start with"),
    ],
)
def test_reference_rejects_malformed_data(reference, edit, message):
    data = json.loads(json.dumps(reference.to_dict()))
    edit(data)
    with pytest.raises(ValueError, match=message):
        drift.DriftReference.from_dict(data)


def test_build_reference_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one training frame"):
        drift.build_reference(iter([]))
    with pytest.raises(ValueError, match="at least 10 frames"):
        drift.build_reference([strips(5, seed=0)])
    with pytest.raises(ValueError, match="batch 1 is"):
        drift.build_reference([strips(20, seed=0), np.zeros((2, 8, 8), np.uint8)])


# --------------------------------------------------------------------------- scores


def test_psi_and_ks_agree_with_direct_definitions(reference):
    window = drift.line_stats(strips(300, seed=50, shift=4.0), defect_counts(300, seed=51), 4)
    scores = drift.drift_scores(reference, window)
    for j, name in enumerate(reference.names):
        stat = reference[name]
        values = window[:, j].astype(np.float64)
        # PSI by its textbook formula, bin by bin with np.histogram over right-closed bins.
        edges = np.array(stat.edges)
        live_counts = np.array([(values <= edges[0]).sum()]
                               + [((values > a) & (values <= b)).sum() for a, b in zip(edges[:-1], edges[1:])]
                               + [(values > edges[-1]).sum()])
        live = (live_counts + 0.5) / (values.size + 0.5 * live_counts.size)
        ref = np.array(stat.proportions)
        assert scores[name]["psi"] == pytest.approx(float(((live - ref) * np.log(live / ref)).sum()), rel=1e-9)
        if stat.ks_applies:
            # KS as the largest CDF gap on a dense grid (plus both sides of every sample value).
            q = np.array(stat.quantiles)
            grid = np.concatenate([np.linspace(q[0] - 5, q[-1] + 5, 20001), values, np.nextafter(values, -np.inf)])
            live_cdf = np.searchsorted(np.sort(values), grid, side="right") / values.size
            ref_cdf = np.interp(grid, q, np.linspace(0, 1, q.size), left=0, right=1)
            assert scores[name]["ks"] == pytest.approx(np.abs(live_cdf - ref_cdf).max(), abs=1e-6)
        else:
            assert scores[name]["ks"] is None
