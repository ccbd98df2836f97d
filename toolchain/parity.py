"""Parity between two runs of the inspection graph: an exported model against its reference.

``trainer export`` compares ONNX Runtime with the torch eager reference (and an FP16 graph with
the FP32 reference); the backend tests compare backends with each other. Everything here is
numpy: the outputs of any backend can be compared.

What is measured, and why:

- ``max_prob_diff`` / ``mean_prob_diff``: largest and mean absolute difference of the mean fold
  probabilities (a non-finite probability fails outright).
- ``mask_mismatch_fraction``: fraction of mask pixels that differ, *excluding* pixels whose
  reference probability lies within ``threshold_band`` of their class threshold. Such a pixel may
  legitimately land on either side of the threshold after any rounding; a pixel far from it may not.
- ``max_count_diff``: largest per-(image, class) pixel-count difference. Counts must also equal the
  sum of the candidate's own masks (a count accumulated in fp16 would not), and ``present`` must
  equal ``counts >= min_area``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engine import graph


@dataclass(frozen=True)
class Tolerance:
    """Limits beyond which a parity check fails.

    Attributes:
        max_prob_diff: largest allowed absolute probability difference.
        max_mean_prob_diff: largest allowed mean absolute probability difference.
        max_mask_mismatch: largest allowed fraction of differing mask pixels outside the band.
        threshold_band: pixels whose reference probability is within this distance of the threshold
            are excluded from the mask comparison.
    """

    max_prob_diff: float
    max_mask_mismatch: float
    max_mean_prob_diff: float = 1.0
    threshold_band: float = 1e-3
    min_mask_dice: float = 0.0
    min_present_agreement: float = 0.0
    max_count_diff: int | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def with_overrides(self, overrides: dict[str, float]) -> Tolerance:
        """This tolerance with some limits replaced (``engine build --tolerance KEY=VALUE``).

        Raises:
            ValueError: an unknown key, naming the known ones.
        """
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown tolerance key(s) {unknown}; known: {', '.join(self.field_names())}")
        values = {k: (int(v) if k == "max_count_diff" else float(v)) for k, v in overrides.items()}
        return dataclasses.replace(self, **values)


# FP32 ONNX Runtime vs FP32 torch: the same arithmetic in a different order; float32 rounding of
# a few hundred accumulated terms stays far below 1e-4, so any mask pixel outside the 1e-3 band
# that differs is a real bug.
FP32_TOLERANCE = Tolerance(max_prob_diff=1e-4, max_mask_mismatch=0.0, max_mean_prob_diff=1e-5)
# FP16 U-Nets vs FP32: half precision keeps ~3 decimal digits and the error grows with depth. A
# broken conversion (overflow, a wrong cast, lost normalisation) moves probabilities by tenths and
# flips masks wholesale: 5e-2 max, 1e-3 mean and 0.1 % of mask pixels catch it without failing a
# healthy export (measurements in benchmarks/RESULTS.md, "Notes moved from docstrings").
FP16_TOLERANCE = Tolerance(max_prob_diff=5e-2, max_mask_mismatch=1e-3, max_mean_prob_diff=1e-3)


# BF16 U-Nets (OpenVINO, pre/post-processing fp32) vs FP32: bf16 keeps 8 significant bits, 3 fewer
# than fp16, so errors are about 8x fp16's; random weights put every probability near 0.5, so the
# wider band and the Dice/label limits matter more than per-pixel agreement. The limits stay well
# under what a broken graph does (measurements in benchmarks/RESULTS.md).
BF16_TOLERANCE = Tolerance(
    max_prob_diff=1e-1, max_mask_mismatch=5e-3, max_mean_prob_diff=5e-3, threshold_band=1e-2,
    min_mask_dice=0.9, min_present_agreement=0.95,
)
# INT8 U-Nets (NNCF post-training quantisation, pre/post-processing fp32) vs FP32: 8-bit activations
# and weights; what matters is the decision, so int8 is held to bf16's decision limits (mask Dice
# >= 0.9, labels agreeing on >= 95 % of (image, class) pairs, <= 0.5 % of the pixels outside the
# band differing, mean |dprob| <= 5e-3) with a wider band (5e-2) for its coarser rounding. The
# largest single-pixel probability difference is reported, not limited: on a trained model, whose
# sigmoid is steep, a defect's edge moved by one U-Net pixel changes the upsampled probability by
# nearly 1 there (the trained `make demo` model at mask Dice 0.976 and every label agreeing: max
# 0.99), so a limit below 1 refuses every healthy build and says nothing the mask limits do not. A
# quantised threshold (the trap of a plain NNCF run) gives empty masks: Dice 0; a quantised stem
# convolution on that model gave Dice 0.857 and invented stains (benchmarks/RESULTS.md).
INT8_TOLERANCE = Tolerance(
    max_prob_diff=1.0, max_mask_mismatch=5e-3, max_mean_prob_diff=5e-3, threshold_band=5e-2,
    min_mask_dice=0.9, min_present_agreement=0.95,
)
TOLERANCES = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE, "bf16": BF16_TOLERANCE, "int8": INT8_TOLERANCE}


def tolerance_for(precision: str) -> Tolerance:
    """The tolerance a graph of ``precision`` is held to against the FP32 reference."""
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {', '.join(TOLERANCES)}, got {precision!r}")
    return TOLERANCES[precision]


@dataclass
class ParityReport:
    """The outcome of comparing a candidate's outputs with a reference's on the same frames."""

    reference: str
    candidate: str
    frames: int
    tolerance: Tolerance
    max_prob_diff: float | None
    mean_prob_diff: float | None
    mask_mismatch_fraction: float
    near_threshold_fraction: float
    max_count_diff: int
    present_mismatches: int
    mask_dice: float = 1.0
    present_agreement: float = 1.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        if self.max_prob_diff is None or self.mean_prob_diff is None:
            prob = "max |dprob| n/a"
        else:
            prob = (
                f"max |dprob| {self.max_prob_diff:.3g} (<= {self.tolerance.max_prob_diff:g}), mean "
                f"{self.mean_prob_diff:.3g} (<= {self.tolerance.max_mean_prob_diff:g})"
            )
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return (
            f"{self.candidate} vs {self.reference} on {self.frames} frames: {prob}, differing mask pixels {self.mask_mismatch_fraction:.3g} "
            f"(<= {self.tolerance.max_mask_mismatch:g}, excluding {self.near_threshold_fraction:.3g} within "
            f"{self.tolerance.threshold_band:g} of the threshold), mask Dice {self.mask_dice:.4f}, max |dcount| "
            f"{self.max_count_diff}, present mismatches {self.present_mismatches} (agreement "
            f"{self.present_agreement:.3f}): {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _get(outputs: Any, name: str) -> Any:
    return outputs[name] if isinstance(outputs, dict) else getattr(outputs, name)


def compare_outputs(
    reference: Any,
    candidate: Any,
    thresholds: np.ndarray | list[float],
    min_areas: np.ndarray | list[int],
    tolerance: Tolerance,
    reference_name: str = "reference",
    candidate_name: str = "candidate",
    gated: bool = False,
) -> ParityReport:
    """Compares two sets of inspection outputs (``InspectionResult`` or dicts of arrays).

    ``gated``: the model has an empty-frame gate, so ``present`` may be false where the count
    reaches the minimum area (never the other way round).

    ``reference`` must carry ``probs`` (they define the near-threshold band); the probability
    difference is measured only when ``candidate`` has them too.
    """
    ref_probs = np.asarray(_get(reference, graph.PROBS_NAME), dtype=np.float32)
    ref_masks = np.asarray(_get(reference, graph.MASKS.name))
    cand_masks = np.asarray(_get(candidate, graph.MASKS.name))
    ref_counts = np.asarray(_get(reference, graph.COUNTS.name), dtype=np.int64)
    cand_counts = np.asarray(_get(candidate, graph.COUNTS.name), dtype=np.int64)
    cand_present = np.asarray(_get(candidate, graph.PRESENT.name), dtype=bool)
    ref_present = np.asarray(_get(reference, graph.PRESENT.name), dtype=bool)
    cand_probs = _get(candidate, graph.PROBS_NAME)
    if ref_masks.shape != cand_masks.shape:
        raise ValueError(f"mask shapes differ: {reference_name} {ref_masks.shape}, {candidate_name} {cand_masks.shape}")
    c = ref_masks.shape[1]
    t = np.asarray(thresholds, dtype=np.float32).reshape(1, c, 1, 1)
    near = np.abs(ref_probs - t) <= tolerance.threshold_band
    differ = ref_masks != cand_masks
    far = ~near
    far_pixels = int(far.sum())
    mismatch = float((differ & far).sum() / far_pixels) if far_pixels else 0.0
    max_prob_diff = mean_prob_diff = None
    finite = True
    if cand_probs is not None:
        cand_probs = np.asarray(cand_probs, dtype=np.float32)
        finite = bool(np.isfinite(cand_probs).all())
        diff = np.abs(ref_probs - cand_probs)
        max_prob_diff, mean_prob_diff = float(np.nanmax(diff)), float(np.nanmean(diff))
    count_diff = np.abs(ref_counts - cand_counts)
    report = ParityReport(
        reference=reference_name,
        candidate=candidate_name,
        frames=int(ref_masks.shape[0]),
        tolerance=tolerance,
        max_prob_diff=max_prob_diff,
        mean_prob_diff=mean_prob_diff,
        mask_mismatch_fraction=mismatch,
        near_threshold_fraction=float(near.mean()),
        max_count_diff=int(count_diff.max()),
        present_mismatches=int((ref_present != cand_present).sum()),
        mask_dice=mask_dice(ref_masks, cand_masks),
        present_agreement=float((ref_present == cand_present).mean()),
    )
    report.failures += _limit_failures(report, tolerance, finite, candidate_name)
    report.failures += _consistency_failures(cand_masks, cand_counts, cand_present, min_areas, candidate_name, gated)
    return report


def _limit_failures(report: ParityReport, tolerance: Tolerance, finite: bool, candidate_name: str) -> list[str]:
    """The tolerance's limits that ``report`` exceeds, each saying by how much."""
    failures = []
    max_prob_diff, mean_prob_diff, mismatch = report.max_prob_diff, report.mean_prob_diff, report.mask_mismatch_fraction
    if not finite:
        failures.append(f"{candidate_name} probabilities include NaN or infinity (overflow?)")
    if max_prob_diff is not None and max_prob_diff > tolerance.max_prob_diff:
        failures.append(f"max |dprob| {max_prob_diff:.3g} exceeds {tolerance.max_prob_diff:g}")
    if mean_prob_diff is not None and mean_prob_diff > tolerance.max_mean_prob_diff:
        failures.append(f"mean |dprob| {mean_prob_diff:.3g} exceeds {tolerance.max_mean_prob_diff:g}")
    if mismatch > tolerance.max_mask_mismatch:
        failures.append(
            f"{mismatch:.3g} of the mask pixels away from the threshold differ (allowed {tolerance.max_mask_mismatch:g})"
        )
    if report.mask_dice < tolerance.min_mask_dice:
        failures.append(f"mask Dice {report.mask_dice:.4f} below {tolerance.min_mask_dice:g}")
    if report.present_agreement < tolerance.min_present_agreement:
        failures.append(
            f"labels agree on {report.present_agreement:.3f} of (image, class) pairs, below {tolerance.min_present_agreement:g}"
        )
    if tolerance.max_count_diff is not None and report.max_count_diff > tolerance.max_count_diff:
        failures.append(f"max |dcount| {report.max_count_diff} exceeds {tolerance.max_count_diff}")
    return failures


def _consistency_failures(masks: np.ndarray, counts: np.ndarray, present: np.ndarray, min_areas: Any,
                          candidate_name: str, gated: bool = False) -> list[str]:
    """Counts must equal the candidate's own mask sums, and present must be counts >= min_area."""
    failures = []
    own_sums = masks.astype(np.int64).sum(axis=(2, 3))
    if not np.array_equal(own_sums, counts):
        n, k = np.argwhere(own_sums != counts)[0]
        failures.append(
            f"{candidate_name} counts disagree with its own masks (image {n}, class {k + 1}: count "
            f"{counts[n, k]}, mask pixels {own_sums[n, k]})"
        )
    expected_present = counts >= np.asarray(min_areas, dtype=np.int64).reshape(1, masks.shape[1])
    if gated and (present & ~expected_present).any():
        failures.append(f"{candidate_name} present where counts < min_area")
    elif not gated and not np.array_equal(expected_present, present):
        failures.append(f"{candidate_name} present disagrees with counts >= min_area")
    return failures


def mask_dice(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Dice of two sets of 0/1 masks over all their pixels (1.0 when both are empty)."""
    a, b = reference.astype(bool), candidate.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def synthetic_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Deterministic strip-like uint8 frames ``[n, height, width]`` for parity checks and tests.

    A rolled-steel look (a brightness gradient across the strip, rolling streaks along it, sensor
    noise) with dark pits and bright scratches, so networks see varied inputs rather than flat
    noise, and their outputs vary from frame to frame.
    """
    if n < 1 or height < 1 or width < 1:
        raise ValueError(f"need n, height, width >= 1, got {n}, {height}, {width}")
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[None, :, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, None, :]
    level = rng.uniform(90, 150, size=(n, 1, 1)).astype(np.float32)
    tilt = rng.uniform(-30, 30, size=(n, 1, 1)).astype(np.float32)
    streaks = rng.normal(0, 6, size=(n, height, 1)).astype(np.float32)
    frames = level + tilt * y + streaks + rng.normal(0, 8, size=(n, height, width)).astype(np.float32)
    spots = 6
    cy = rng.uniform(0, 1, size=(n, spots, 1, 1)).astype(np.float32)
    cx = rng.uniform(0, 1, size=(n, spots, 1, 1)).astype(np.float32)
    ry = rng.uniform(0.05, 0.25, size=(n, spots, 1, 1)).astype(np.float32)
    rx = rng.uniform(0.005, 0.08, size=(n, spots, 1, 1)).astype(np.float32)
    depth = rng.choice([-90.0, 80.0], size=(n, spots, 1, 1)).astype(np.float32)
    inside = ((y[:, None] - cy) / ry) ** 2 + ((x[:, None] - cx) / rx) ** 2 <= 1.0
    frames += (inside * depth).sum(axis=1)
    return np.clip(frames, 0, 255).astype(np.uint8)
