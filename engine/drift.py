"""Line drift: cheap frame statistics, a reference built from training data, and live scores.

One truth for the statistics: ``trainer export`` computes them on a sample of training frames
(and out-of-fold predicted defect counts) to build a :class:`DriftReference`, which travels in the
model as ``ModelMetadata.drift_reference``; the server computes the very same statistics on every
batch it inspects and keeps a rolling window per camera (``server.drift_monitor.DriftMonitor``, the
server's policy: cameras, thresholds, warnings), which scores the window against the reference
with :class:`Scorer`.

Statistics (one row per frame):

* ``brightness``: mean grey level (0..255);
* ``contrast``: standard deviation of the grey levels;
* ``dark_ratio``: share of pixels ``<= DARK_LEVEL``;
* ``saturated_ratio``: share of pixels ``>= SATURATED_LEVEL``;
* ``area_class_<k>``: predicted defect pixels of class k as a share of the frame (from the
  inspection graph's exact ``counts``).

Scores per statistic:

* PSI (population stability index) over the reference's histogram bins, whose edges are
  quantiles of the reference sample (right-closed bins, so a point mass such as "no defect
  pixels" gets a bin of its own); both histograms get additive smoothing so an empty bin is finite.
* KS: the largest gap between the window's empirical CDF and the reference CDF, which the
  reference stores as quantiles (linear in between: accurate to about one quantile step). KS is
  only computed where it fits, a statistic whose reference sample has no large point mass
  (``ks_applies``); the zero-inflated area and ratio statistics usually get PSI only.

Only numpy and OpenCV are used, so the server imports this without torch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from engine.metadata import class_ids

log = logging.getLogger(__name__)

FORMAT = "strip-inspection/drift-reference/1"

#: A pixel at or below this grey level counts as dark (unlit strip, lens shadow, frame edges).
DARK_LEVEL = 16
#: A pixel at or above this grey level counts as saturated (specular glare, overexposure).
SATURATED_LEVEL = 250
#: The frame statistics, in the column order of :func:`frame_stats`.
FRAME_STAT_NAMES: tuple[str, ...] = ("brightness", "contrast", "dark_ratio", "saturated_ratio")
AREA_STAT_PREFIX = "area_class_"

DEFAULT_BINS = 10
DEFAULT_QUANTILES = 101
#: Pseudo-count added to every bin of both histograms before PSI (keeps log(q/p) finite).
DEFAULT_SMOOTHING = 0.5
#: KS is skipped for a statistic when one value holds more than this share of its reference
#: sample: the stored quantiles cannot describe a CDF with a jump of that size.
KS_MAX_POINT_MASS = 0.05

#: Frames a drift window needs before it is scored (the server's default minimum fill); a
#: reference built from fewer frames has coarse bins.
DEFAULT_MIN_FILL = 200


def area_stat_names(num_classes: int) -> tuple[str, ...]:
    """Names of the per-class area statistics, ``area_class_1`` ... ``area_class_C``."""
    return tuple(f"{AREA_STAT_PREFIX}{k}" for k in class_ids(num_classes))


# --------------------------------------------------------------------------- statistics


def frame_stats(frames: np.ndarray) -> np.ndarray:
    """Statistics of uint8 grayscale frames ``[N, H, W]`` -> float32 ``[N, len(FRAME_STAT_NAMES)]``.

    Per frame, OpenCV's ``meanStdDev`` (integer sums of the grey levels and their squares, then
    double precision) and two counts of a compared copy; about 0.08 ms a full-resolution 256x1600
    frame on one CPU core, a fifth of the float32 BLAS formulation it replaced, and exact to the
    float32 rounding of the result. The server computes them for every frame it answers.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 3 or frames.shape[0] < 1 or frames.shape[1] * frames.shape[2] < 1:
        raise ValueError(
            f"frame statistics need uint8 grayscale frames [N, H, W] with N >= 1, got {frames.dtype} "
            f"{list(frames.shape)}"
        )
    n = frames.shape[0]
    pixels = frames.shape[1] * frames.shape[2]
    stats = np.empty((n, len(FRAME_STAT_NAMES)), np.float64)
    for i in range(n):
        frame = np.ascontiguousarray(frames[i])
        mean, std = cv2.meanStdDev(frame)
        stats[i, 0] = mean[0, 0]
        stats[i, 1] = std[0, 0]
        # A 1-D count_nonzero is a vectorised popcount; with axis= numpy sums booleans instead (4x slower).
        stats[i, 2] = np.count_nonzero(frame <= DARK_LEVEL) / pixels
        stats[i, 3] = np.count_nonzero(frame >= SATURATED_LEVEL) / pixels
    return stats.astype(np.float32)


def area_fractions(counts: np.ndarray, frame_pixels: int) -> np.ndarray:
    """Predicted defect pixels per class ``[N, C]`` (any integer dtype) -> share of the frame, float32.

    Args:
        counts: exact per-class pixel counts, as the inspection graph outputs them.
        frame_pixels: pixels per frame at the resolution the counts were taken (``H * W``).
    """
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must have shape [N, C], got {list(counts.shape)}")
    if frame_pixels < 1:
        raise ValueError(f"frame_pixels must be positive, got {frame_pixels}")
    if counts.size and (counts.min() < 0 or counts.max() > frame_pixels):
        raise ValueError(f"counts must lie in 0..{frame_pixels} (pixels per frame), got {counts.min()}..{counts.max()}")
    return (counts.astype(np.float64) / frame_pixels).astype(np.float32)


def line_stats(frames: np.ndarray, counts: np.ndarray | None, num_classes: int) -> np.ndarray:
    """:func:`frame_stats` followed by the area fraction of ``num_classes`` classes: ``[N, 4 + C]``.

    ``counts`` (``[N, >= C]``, counted over the frames' pixels) may be None when ``num_classes`` is 0.
    """
    stats = frame_stats(frames)
    if num_classes == 0:
        return stats
    if counts is None:
        raise ValueError(f"the drift reference has {num_classes} area statistics: counts are needed")
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] != stats.shape[0] or counts.shape[1] < num_classes:
        raise ValueError(
            f"counts must have shape [{stats.shape[0]}, >= {num_classes}] (one row per frame), got {list(counts.shape)}"
        )
    areas = area_fractions(counts[:, :num_classes], frames.shape[1] * frames.shape[2])
    return np.concatenate([stats, areas], axis=1)


# --------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class StatReference:
    """The reference distribution of one statistic.

    Attributes:
        name: the statistic.
        edges: inner bin edges, strictly increasing; bin ``i`` holds ``edges[i-1] < x <= edges[i]``
            (``len(edges) + 1`` bins, the outer ones open-ended).
        proportions: smoothed reference share per bin (all > 0, sum 1).
        quantiles: reference values at evenly spaced probability levels 0..1 (the CDF for KS), or
            None when KS does not fit this statistic.
    """

    name: str
    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    quantiles: tuple[float, ...] | None

    @property
    def ks_applies(self) -> bool:
        return self.quantiles is not None


@dataclass(frozen=True)
class DriftReference:
    """Reference distributions of the line statistics, built from training data at export.

    Attributes:
        stats: one :class:`StatReference` per statistic, frame statistics first.
        frames: frames the frame statistics were computed on.
        count_frames: frames (out-of-fold predictions) the area statistics were computed on.
        smoothing: the pseudo-count added to every bin (also applied to live windows).
        dark_level, saturated_level: the pixel levels the ratios were computed with; a reference
            built with other levels is rejected on load rather than compared with the wrong thing.
    """

    stats: tuple[StatReference, ...]
    frames: int
    count_frames: int = 0
    smoothing: float = DEFAULT_SMOOTHING
    dark_level: int = DARK_LEVEL
    saturated_level: int = SATURATED_LEVEL
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stats]
        if tuple(names[: len(FRAME_STAT_NAMES)]) != FRAME_STAT_NAMES:
            raise ValueError(f"drift reference statistics must start with {list(FRAME_STAT_NAMES)}, got {names}")
        areas = names[len(FRAME_STAT_NAMES):]
        if tuple(areas) != area_stat_names(len(areas)):
            raise ValueError(
                f"drift reference area statistics must be {list(area_stat_names(len(areas)))} in order, got {areas}"
            )
        if (self.dark_level, self.saturated_level) != (DARK_LEVEL, SATURATED_LEVEL):
            raise ValueError(
                f"drift reference was built with dark level {self.dark_level} and saturated level "
                f"{self.saturated_level}; this version computes {DARK_LEVEL} and {SATURATED_LEVEL}: "
                "re-export the model to rebuild its drift reference"
            )
        if not self.smoothing > 0:
            raise ValueError(f"drift reference smoothing must be > 0, got {self.smoothing}")
        self._index.update({n: i for i, n in enumerate(names)})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stats)

    @property
    def num_classes(self) -> int:
        """How many per-class area statistics the reference holds."""
        return len(self.stats) - len(FRAME_STAT_NAMES)

    def __getitem__(self, name: str) -> StatReference:
        try:
            return self.stats[self._index[name]]
        except KeyError:
            raise KeyError(f"no drift statistic {name!r}; the reference has {list(self.names)}") from None

    def line_stats(self, frames: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
        """The live statistics of a batch, in this reference's column order."""
        return line_stats(frames, counts, self.num_classes)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, the form stored in ``ModelMetadata.drift_reference``."""
        return {
            "format": FORMAT,
            "frames": self.frames,
            "count_frames": self.count_frames,
            "smoothing": self.smoothing,
            "dark_level": self.dark_level,
            "saturated_level": self.saturated_level,
            "stats": [
                {
                    "name": s.name,
                    "edges": list(s.edges),
                    "proportions": list(s.proportions),
                    "quantiles": None if s.quantiles is None else list(s.quantiles),
                }
                for s in self.stats
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftReference:
        """Validates and loads :meth:`to_dict` output.

        Raises:
            ValueError: wrong format tag, missing keys, or bins/quantiles that are not a valid
                distribution; the message names the statistic.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"drift reference must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"drift reference has format {data.get('format')!r}, expected {FORMAT!r}")
        try:
            raw_stats = data["stats"]
            stats = tuple(_stat_from_dict(s) for s in raw_stats)
            return cls(
                stats=stats,
                frames=int(data["frames"]),
                count_frames=int(data.get("count_frames", 0)),
                smoothing=float(data.get("smoothing", DEFAULT_SMOOTHING)),
                dark_level=int(data.get("dark_level", DARK_LEVEL)),
                saturated_level=int(data.get("saturated_level", SATURATED_LEVEL)),
            )
        except KeyError as exc:
            raise ValueError(f"drift reference lacks the key {exc}") from None
        except TypeError as exc:
            raise ValueError(f"drift reference is malformed: {exc}") from None


def _stat_from_dict(data: Mapping[str, Any]) -> StatReference:
    name = data.get("name", "?") if isinstance(data, Mapping) else "?"
    if not isinstance(data, Mapping) or not isinstance(name, str):
        raise ValueError(f"drift reference statistic entry must be an object with a name, got {data!r}")
    edges = np.asarray(data["edges"], dtype=np.float64)
    proportions = np.asarray(data["proportions"], dtype=np.float64)
    if edges.ndim != 1 or not np.isfinite(edges).all() or (np.diff(edges) <= 0).any():
        raise ValueError(f"drift statistic {name}: edges must be finite and strictly increasing")
    if proportions.shape != (edges.size + 1,):
        raise ValueError(
            f"drift statistic {name}: {proportions.size} proportions for {edges.size} edges "
            f"(expected {edges.size + 1})"
        )
    if not (proportions > 0).all() or abs(proportions.sum() - 1.0) > 1e-6:
        raise ValueError(f"drift statistic {name}: proportions must all be > 0 and sum to 1")
    quantiles = data.get("quantiles")
    if quantiles is not None:
        q = np.asarray(quantiles, dtype=np.float64)
        if q.ndim != 1 or q.size < 2 or not np.isfinite(q).all() or (np.diff(q) < 0).any():
            raise ValueError(f"drift statistic {name}: quantiles must be >= 2 finite non-decreasing values")
        quantiles = tuple(q.tolist())
    return StatReference(name, tuple(edges.tolist()), tuple(proportions.tolist()), quantiles)


def _reference_of(name: str, values: np.ndarray, bins: int, quantile_levels: np.ndarray, smoothing: float) -> StatReference:
    values = values.astype(np.float64)
    inner = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    # Several quantiles fall on one value where the sample has a point mass (e.g. no defect
    # pixels): keep that value once, its right-closed bin then holds exactly the point mass.
    edges = np.unique(inner)
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=edges.size + 1)
    proportions = (counts + smoothing) / (values.size + smoothing * counts.size)
    _, ties = np.unique(values, return_counts=True)
    ks = ties.max() / values.size <= KS_MAX_POINT_MASS
    quantiles = tuple(np.quantile(values, quantile_levels).tolist()) if ks else None
    return StatReference(name, tuple(edges.tolist()), tuple(proportions.tolist()), quantiles)


def build_reference(
    frames: Iterable[np.ndarray],
    counts: np.ndarray | None = None,
    count_pixels: int | None = None,
    bins: int = DEFAULT_BINS,
    quantiles: int = DEFAULT_QUANTILES,
    smoothing: float = DEFAULT_SMOOTHING,
) -> DriftReference:
    """Builds the drift reference from a sample of training frames and out-of-fold counts.

    Args:
        frames: uint8 grayscale frames, as batches ``[n, H, W]`` or single frames ``[H, W]``; only
            the statistics of each batch are kept, so a generator over a large sample is fine.
        counts: out-of-fold predicted defect pixels per class ``[M, C]``; None for a reference
            without area statistics.
        count_pixels: pixels per frame at the resolution the counts were taken (e.g. ``128 * 800``
            for counts at the training resolution); defaults to the frames' ``H * W``.
        bins: histogram bins per statistic (fewer where quantiles coincide).
        quantiles: quantile levels stored for KS (101 = every percentile).
        smoothing: pseudo-count added to every bin.

    Raises:
        ValueError: no frames, frames that are not uint8 grayscale, fewer frames than bins, or
            counts of the wrong shape or range.
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if quantiles < 2:
        raise ValueError(f"quantiles must be >= 2, got {quantiles}")
    chunks = []
    frame_size: tuple[int, int] | None = None
    for i, batch in enumerate(frames):
        batch = np.asarray(batch)
        if batch.ndim == 2:
            batch = batch[None]
        if frame_size is not None and batch.shape[1:] != frame_size:
            raise ValueError(f"frames batch {i} is {list(batch.shape[1:])}, earlier frames were {list(frame_size)}")
        frame_size = batch.shape[1:]
        chunks.append(frame_stats(batch))
    if not chunks:
        raise ValueError("a drift reference needs at least one training frame, got none")
    stats = np.concatenate(chunks)
    if stats.shape[0] < bins:
        raise ValueError(f"a drift reference with {bins} bins needs at least {bins} frames, got {stats.shape[0]}")
    if stats.shape[0] < DEFAULT_MIN_FILL:
        log.warning("drift reference from only %d frames: its bins will be coarse", stats.shape[0])
    levels = np.linspace(0.0, 1.0, quantiles)
    refs = [_reference_of(name, stats[:, j], bins, levels, smoothing) for j, name in enumerate(FRAME_STAT_NAMES)]
    count_frames = 0
    if counts is not None:
        pixels = count_pixels if count_pixels is not None else frame_size[0] * frame_size[1]
        areas = area_fractions(counts, pixels)
        if areas.shape[0] < bins:
            raise ValueError(f"a drift reference with {bins} bins needs counts of at least {bins} frames, got {areas.shape[0]}")
        count_frames = areas.shape[0]
        names = area_stat_names(areas.shape[1])
        refs += [_reference_of(name, areas[:, k], bins, levels, smoothing) for k, name in enumerate(names)]
    return DriftReference(stats=tuple(refs), frames=int(stats.shape[0]), count_frames=count_frames, smoothing=smoothing)


# --------------------------------------------------------------------------- scores


def _padded(rows: Sequence[Sequence[float]], fill: float) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), fill, dtype=np.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class Scorer:
    """The reference in array form, padded to one width so a window is scored in a few numpy calls
    (built once per reference; the server's per-camera monitor rescores every window with it)."""

    def __init__(self, reference: DriftReference) -> None:
        self.names = reference.names
        self.smoothing = reference.smoothing
        # Padding edges with +inf adds bins nothing can fall in (x > inf is never true).
        self.edges = _padded([s.edges for s in reference.stats], np.inf)  # [S, E]
        self.nbins = np.array([len(s.proportions) for s in reference.stats])  # [S]
        self.proportions = _padded([s.proportions for s in reference.stats], 1.0)  # [S, E + 1]
        self.valid = np.arange(self.proportions.shape[1])[None, :] < self.nbins[:, None]
        self.ks_columns = [j for j, s in enumerate(reference.stats) if s.quantiles is not None]
        self.quantiles = [np.asarray(reference.stats[j].quantiles) for j in self.ks_columns]

    def psi(self, window: np.ndarray) -> np.ndarray:
        """PSI per statistic of a window ``[W, S]`` -> ``[S]``."""
        w, s = window.shape
        bins = (window[:, :, None] > self.edges[None, :, :]).sum(axis=2)  # [W, S]
        width = self.proportions.shape[1]
        counts = np.bincount((bins + np.arange(s) * width).ravel(), minlength=s * width).reshape(s, width)
        live = (counts + self.smoothing) / (w + self.smoothing * self.nbins[:, None])
        terms = np.where(self.valid, (live - self.proportions) * np.log(live / self.proportions), 0.0)
        return terms.sum(axis=1)

    def ks(self, window: np.ndarray) -> dict[int, float]:
        """KS statistic of the window against each KS-capable statistic's reference CDF."""
        if not self.ks_columns:
            return {}
        w = window.shape[0]
        ordered = np.sort(window[:, self.ks_columns].astype(np.float64), axis=0)  # [W, K]
        above = np.arange(1, w + 1) / w  # the window's ECDF just after each sorted value
        below = np.arange(0, w) / w  # ... and just before it
        out = {}
        for i, j in enumerate(self.ks_columns):
            q = self.quantiles[i]
            ref_cdf = np.interp(ordered[:, i], q, np.linspace(0.0, 1.0, q.size), left=0.0, right=1.0)
            # The reference CDF is continuous (piecewise linear), so the supremum of the gap is
            # reached at a window value, from one side or the other of the ECDF's step.
            out[j] = float(max((above - ref_cdf).max(), (ref_cdf - below).max()))
        return out

    def scores(self, window: np.ndarray) -> dict[str, dict[str, float | None]]:
        """``{statistic: {"psi": float, "ks": float | None}}`` of a checked window ``[W, S]``."""
        psi, ks = self.psi(window), self.ks(window)
        return {name: {"psi": float(psi[j]), "ks": ks.get(j)} for j, name in enumerate(self.names)}


def drift_scores(reference: DriftReference, window: np.ndarray) -> dict[str, dict[str, float | None]]:
    """PSI and KS (None where KS does not fit) of a window of statistics rows ``[W, S]``."""
    window = check_rows(window, reference.names)
    if window.shape[0] == 0:
        raise ValueError("cannot score an empty window of statistics")
    return Scorer(reference).scores(window)


def check_rows(stats: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Statistics rows ``[N, S]`` as float32, checked for shape and finiteness."""
    stats = np.asarray(stats, dtype=np.float32)
    if stats.ndim != 2 or stats.shape[1] != len(names):
        raise ValueError(f"statistics rows must have shape [N, {len(names)}] ({', '.join(names)}), got {list(stats.shape)}")
    if not np.isfinite(stats).all():
        raise ValueError("statistics rows contain NaN or infinity")
    return stats
