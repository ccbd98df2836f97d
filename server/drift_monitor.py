"""The server's per-camera drift monitor: a rolling window of frame statistics per camera, scored
against the model's reference (``engine.drift``: the statistics, the reference and the scores).

What is policy lives here: which cameras are tracked (at most ``max_cameras``, least recently seen
dropped first), when a score counts as drifted and recovered (hysteresis), and how often that is
logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.drift import DriftReference, Scorer, check_rows
from server.config import (
    DEFAULT_DRIFT_MAX_CAMERAS,
    DEFAULT_DRIFT_MIN_FRAMES,
    DEFAULT_DRIFT_WINDOW,
    DEFAULT_KS_THRESHOLD,
    DEFAULT_PSI_THRESHOLD,
    check_drift_settings,
    clip,
)

log = logging.getLogger(__name__)

# A score must fall below threshold * RECOVER_RATIO to count as recovered, so a score hovering at
# the threshold does not log a warning every batch.
RECOVER_RATIO = 0.8
#: Camera evictions are logged at most this often (seconds); the log line counts those in between.
EVICTION_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class DriftCrossing:
    """A score that crossed its threshold (``crossed``) or fell back below it (not ``crossed``)."""

    camera_id: str
    statistic: str
    score: str  # "psi" or "ks"
    value: float
    threshold: float
    crossed: bool


@dataclass
class CameraDrift:
    """A snapshot of one camera's drift: window fill and, once full enough, the scores."""

    camera_id: str
    frames_seen: int
    window_fill: int
    scores: dict[str, dict[str, float | None]] | None
    over: tuple[tuple[str, str], ...]  # (statistic, score) pairs now over their threshold


class _Window:
    """A fixed-size ring buffer of statistics rows."""

    def __init__(self, size: int, columns: int) -> None:
        self.rows = np.zeros((size, columns), dtype=np.float32)
        self.next = 0
        self.fill = 0
        self.seen = 0
        self.scores: dict[str, dict[str, float | None]] | None = None
        self.over: set[tuple[str, str]] = set()

    def push(self, stats: np.ndarray) -> None:
        size = self.rows.shape[0]
        stats = stats[-size:]  # a batch longer than the window keeps its newest rows
        n = stats.shape[0]
        index = (self.next + np.arange(n)) % size
        self.rows[index] = stats
        self.next = int((self.next + n) % size)
        self.fill = min(self.fill + n, size)

    def view(self) -> np.ndarray:
        return self.rows[: self.fill]  # row order does not matter to PSI or KS


class DriftMonitor:
    """Rolling drift scores per camera against a :class:`DriftReference`.

    Each camera has a ring buffer of its last ``window`` statistics rows. After every update the
    camera's window is rescored (a few numpy calls on at most ``window x S`` values); scores are
    None until ``min_fill`` rows are in. A score crossing its threshold logs one warning and is
    returned as a :class:`DriftCrossing`; it is not reported again until it has recovered (fallen
    below ``threshold * RECOVER_RATIO``, logged at info) and crosses anew.

    Threading: every method may be called from any thread. One lock guards all cameras, held only
    while rows are stored and scored, not while statistics are computed. The server calls :meth:`observe_batch` from its line-feedback thread once a batch's
    frames are answered (see ``server.feedback``), and :meth:`status` / :meth:`scores` from RPC
    handlers and the metrics collector.

    Args:
        reference: what the statistics are compared with.
        window: rows kept per camera.
        min_fill: rows needed before a camera is scored.
        psi_threshold, ks_threshold: scores above these are drift (settable later with
            :meth:`set_thresholds`).
        max_cameras: cameras tracked at once; the camera updated least recently is dropped to make
            room (logged at most once per ``EVICTION_LOG_INTERVAL``, with the count since), so
            unknown camera ids grow neither memory nor the log without bound.
    """

    def __init__(
        self,
        reference: DriftReference,
        window: int = DEFAULT_DRIFT_WINDOW,
        min_fill: int = DEFAULT_DRIFT_MIN_FRAMES,
        psi_threshold: float = DEFAULT_PSI_THRESHOLD,
        ks_threshold: float = DEFAULT_KS_THRESHOLD,
        max_cameras: int = DEFAULT_DRIFT_MAX_CAMERAS,
    ) -> None:
        check_drift_settings(window, min_fill, psi_threshold, ks_threshold, max_cameras)
        self.reference = reference
        self.window = window
        self.min_fill = min_fill
        self.max_cameras = max_cameras
        self.psi_threshold = float(psi_threshold)
        self.ks_threshold = float(ks_threshold)
        self._scorer = Scorer(reference)
        self._cameras: OrderedDict[str, _Window] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0
        self._evicted_unlogged = 0
        self._last_eviction_log = -EVICTION_LOG_INTERVAL

    @property
    def names(self) -> tuple[str, ...]:
        return self.reference.names

    @property
    def cameras(self) -> int:
        """Cameras tracked now."""
        return len(self._cameras)

    def set_thresholds(self, psi: float | None = None, ks: float | None = None) -> None:
        """Changes the thresholds; takes effect at each camera's next update."""
        check_drift_settings(self.window, self.min_fill, self.psi_threshold if psi is None else psi,
                             self.ks_threshold if ks is None else ks, self.max_cameras)
        if psi is not None:
            self.psi_threshold = float(psi)
        if ks is not None:
            self.ks_threshold = float(ks)

    def observe(self, camera_id: str, frames: np.ndarray, counts: np.ndarray | None) -> list[DriftCrossing]:
        """Computes the statistics of one camera's frames ``[N, H, W]`` and :meth:`update`\\ s them."""
        return self.update(camera_id, self.reference.line_stats(frames, counts))

    def observe_batch(
        self, camera_ids: Sequence[str], frames: np.ndarray, counts: np.ndarray | None
    ) -> list[DriftCrossing]:
        """One inference batch of several cameras: ``camera_ids[i]`` took ``frames[i]``.

        The statistics are computed for the whole batch at once, then each camera's rows go to
        its window in batch order.
        """
        stats = self.reference.line_stats(frames, counts)
        return self.update_batch(camera_ids, stats)

    def update_batch(self, camera_ids: Sequence[str], stats: np.ndarray) -> list[DriftCrossing]:
        """:meth:`update` for rows of several cameras (``camera_ids[i]`` owns ``stats[i]``)."""
        stats = check_rows(stats, self.names)
        if len(camera_ids) != stats.shape[0]:
            raise ValueError(f"{len(camera_ids)} camera ids for {stats.shape[0]} statistics rows")
        ids = np.asarray(camera_ids, dtype=object)
        crossings = []
        for camera in dict.fromkeys(camera_ids):  # first-seen order, each camera once
            crossings += self._update(str(camera), stats[ids == camera])
        return crossings

    def update(self, camera_id: str, stats: np.ndarray) -> list[DriftCrossing]:
        """Adds one camera's statistics rows ``[N, S]`` and rescores its window.

        Returns:
            The threshold crossings (and recoveries) this update caused; already logged.
        """
        return self._update(camera_id, check_rows(stats, self.names))

    def _window_of(self, camera_id: str) -> _Window:
        """The camera's window, made (evicting the least recently seen camera if full); under the lock."""
        window = self._cameras.get(camera_id)
        if window is not None:
            self._cameras.move_to_end(camera_id)
            return window
        if len(self._cameras) >= self.max_cameras:
            dropped, _ = self._cameras.popitem(last=False)
            self.evicted += 1
            self._evicted_unlogged += 1
            now = time.monotonic()
            if now - self._last_eviction_log >= EVICTION_LOG_INTERVAL:
                log.warning(
                    "event=drift_camera_evicted max_cameras=%d evicted=%d since_last_log=%d: the drift monitor "
                    "tracks at most %d cameras; dropped %s (least recently seen) for %s",
                    self.max_cameras, self.evicted, self._evicted_unlogged, self.max_cameras,
                    _short(dropped), _short(camera_id),
                )
                self._last_eviction_log = now
                self._evicted_unlogged = 0
        window = self._cameras[camera_id] = _Window(self.window, len(self.names))
        return window

    def _update(self, camera_id: str, stats: np.ndarray) -> list[DriftCrossing]:
        if stats.shape[0] == 0:
            return []
        with self._lock:
            window = self._window_of(camera_id)
            window.push(stats)
            window.seen += stats.shape[0]
            if window.fill < self.min_fill:
                return []
            window.scores = self._scorer.scores(window.view())
            crossings = self._crossings(camera_id, window)
        for c in crossings:
            if c.crossed:
                log.warning(
                    "drift on camera %s: %s %s = %.3f crossed its threshold %.3f",
                    _short(c.camera_id), c.statistic, c.score.upper(), c.value, c.threshold,
                )
            else:
                log.info(
                    "drift on camera %s: %s %s = %.3f is back below its threshold %.3f",
                    _short(c.camera_id), c.statistic, c.score.upper(), c.value, c.threshold,
                )
        return crossings

    def _crossings(self, camera_id: str, window: _Window) -> list[DriftCrossing]:
        out = []
        thresholds = {"psi": self.psi_threshold, "ks": self.ks_threshold}
        assert window.scores is not None
        for name, scores in window.scores.items():
            for kind, value in scores.items():
                if value is None:
                    continue
                key, limit = (name, kind), thresholds[kind]
                if key not in window.over and value > limit:
                    window.over.add(key)
                    out.append(DriftCrossing(camera_id, name, kind, value, limit, crossed=True))
                elif key in window.over and value < limit * RECOVER_RATIO:
                    window.over.discard(key)
                    out.append(DriftCrossing(camera_id, name, kind, value, limit, crossed=False))
        return out

    def scores(self, camera_id: str) -> dict[str, dict[str, float | None]] | None:
        """``{statistic: {"psi": float, "ks": float | None}}`` of the camera's latest window, or
        None while the camera has fewer than ``min_fill`` rows (or was never seen)."""
        with self._lock:
            window = self._cameras.get(camera_id)
            if window is None or window.scores is None or window.fill < self.min_fill:
                return None
            return {k: dict(v) for k, v in window.scores.items()}

    def status(self) -> dict[str, CameraDrift]:
        """A consistent snapshot of every tracked camera (for metrics and the line status RPC)."""
        with self._lock:
            return {
                camera: CameraDrift(
                    camera_id=camera,
                    frames_seen=w.seen,
                    window_fill=w.fill,
                    scores=None if w.fill < self.min_fill or w.scores is None
                    else {k: dict(v) for k, v in w.scores.items()},
                    over=tuple(sorted(w.over)),
                )
                for camera, w in self._cameras.items()
            }


def _short(camera_id: str, limit: int = 64) -> str:
    """A camera id quoted for a log line, cut to ``limit`` characters."""
    return repr(clip(camera_id, limit))
