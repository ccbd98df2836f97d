"""Line feedback in the server: drift monitoring and capture of frames for retraining.

Once an inference batch's frames are answered, the batcher hands the whole batch to
:class:`LineFeedback`, which works on it in a thread of its own (``line-feedback``): not on the
event loop, not on the inference thread, and not in the decode pool, whose threads feed the next
batches.

* Drift, only when the model carries a reference (``ModelMetadata.drift_reference``):
  ``DriftMonitor.observe_batch`` computes the frame statistics of the batch in a few numpy calls
  and rescores each camera's rolling window. Without a reference drift is off, says so once in the
  log, and ``GetLineStatus`` reports why. A score crossing its threshold is logged (a warning
  naming the camera) by the monitor.
* Capture (``--capture-dir``): the policy runs once over the batch; chosen frames (the camera's
  original JPEG/PNG bytes, or the raw frame as the model saw it) go to the writer's bounded queue.

Both follow the model that ran each batch (``FinishedBatch.model_version`` and ``.metadata``): after
a hot swap, the first batch of the new version switches drift to that model's reference (every
camera's window starts afresh, and ``GetLineStatus.model_version`` names the version the scores are
for), and captures name the version that predicted them and are chosen with its minimum areas.

At most ``max_pending`` batches wait for the thread; past that a batch's feedback is skipped and
counted (``feedback_skipped_batches``), so a slow CPU never piles frames up in memory or holds
anything back: the frames were answered before any of this runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engine.drift import DriftReference
from engine.metadata import ModelMetadata
from protos.inspection.v1 import inspection_pb2 as pb
from server.batcher import FinishedBatch
from server.capture import CaptureWriter
from server.config import DEFAULT_DRIFT_MAX_CAMERAS, CaptureConfig, ServerConfig
from server.drift_monitor import CameraDrift, DriftMonitor
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

#: Batches waiting for the feedback thread before new ones are skipped.
DEFAULT_MAX_PENDING = 8
DRIFT_ON = "on"
NO_REFERENCE = "no reference in this model"
#: A skipped batch is logged at most this often (seconds).
SKIP_LOG_INTERVAL = 60.0
#: The ``camera`` label of the cameras beyond ``max_metric_cameras``, aggregated.
OTHER_CAMERA = "other"
CAPTURE_OUTCOMES = ("written", "skipped_queue_full", "skipped_quota", "skipped_error")


def drift_monitor(
    metadata: ModelMetadata, window: int, min_frames: int, psi_threshold: float, ks_threshold: float,
    max_cameras: int = DEFAULT_DRIFT_MAX_CAMERAS,
) -> tuple[DriftMonitor | None, str]:
    """The monitor for a model, or None and why drift is off.

    A reference that does not load (or does not fit the model's classes) turns drift off with the
    reason; it does not stop the model from serving.
    """
    if metadata.drift_reference is None:
        return None, NO_REFERENCE
    try:
        reference = DriftReference.from_dict(metadata.drift_reference)
        if reference.num_classes not in (0, metadata.num_classes):
            raise ValueError(
                f"it has area statistics for {reference.num_classes} classes, the model has {metadata.num_classes}"
            )
    except ValueError as exc:
        return None, f"drift reference in this model is unusable: {exc}"
    monitor = DriftMonitor(reference, window=window, min_fill=min_frames, psi_threshold=psi_threshold,
                           ks_threshold=ks_threshold, max_cameras=max_cameras)
    return monitor, DRIFT_ON


@dataclass(frozen=True)
class ModelDrift:
    """Drift for one model version: its monitor (None when off) and the state ``GetLineStatus`` reports.

    Replaced whole when a batch of another version arrives, so a reader never sees one model's
    monitor with another's version.
    """

    model_version: str
    monitor: DriftMonitor | None
    state: str


class LineFeedback:
    """Drift monitoring and capture for the model that runs each batch.

    Args:
        metadata: the starting model's metadata (drift reference, minimum areas, version).
        model_version: that model's version as answers name it (a repository's version); None: the
            metadata's own.
        drift_window, drift_min_frames, psi_threshold, ks_threshold, drift_max_cameras: see
            :class:`DriftMonitor`.
        max_status_cameras: cameras one :meth:`status` lists at most (it counts the rest).
        capture: where and what to capture; None captures nothing.
        metrics: where the per-batch feedback time goes.
        max_pending: batches waiting for the feedback thread before new ones are skipped.

    Raises:
        ValueError: the capture cannot be set up for this model (e.g. no minimum areas).
    """

    def __init__(
        self,
        metadata: ModelMetadata,
        *,
        drift_window: int,
        drift_min_frames: int,
        psi_threshold: float,
        ks_threshold: float,
        drift_max_cameras: int = DEFAULT_DRIFT_MAX_CAMERAS,
        max_status_cameras: int = ServerConfig.max_status_cameras,
        capture: CaptureConfig | None = None,
        metrics: ServerMetrics | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        model_version: str | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.window = drift_window
        self.min_frames = drift_min_frames
        self.max_cameras = drift_max_cameras
        self.max_status_cameras = max_status_cameras
        self.psi_threshold = psi_threshold
        self.ks_threshold = ks_threshold
        self.drift = self._drift_for(metadata, model_version or metadata.model_version)
        self.capture = capture
        self.writer: CaptureWriter | None = CaptureWriter.from_config(capture, metadata.min_areas) if capture is not None else None
        self._metrics = metrics
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self.skipped_batches = 0
        self._last_skip_log = -SKIP_LOG_INTERVAL
        self._closed = False
        # Threads start on first use: a model without a reference may be swapped for one with it.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="line-feedback")

    # ------------------------------------------------------------------ the model followed

    @property
    def model_version(self) -> str:
        """The version whose drift reference the scores are against (the latest batch's model)."""
        return self.drift.model_version

    @property
    def monitor(self) -> DriftMonitor | None:
        return self.drift.monitor

    @property
    def drift_state(self) -> str:
        return self.drift.state

    @property
    def active(self) -> bool:
        """Whether there is any per-batch work for the current model (drift on, or capturing)."""
        return self.monitor is not None or self.writer is not None

    def _drift_for(self, metadata: ModelMetadata, version: str) -> ModelDrift:
        """A fresh :class:`ModelDrift` for the model ``metadata`` describes, logged."""
        psi, ks = self.psi_threshold, self.ks_threshold
        monitor, state = drift_monitor(metadata, self.window, self.min_frames, psi, ks, self.max_cameras)
        if monitor is not None:
            log.info("event=drift_on statistics=%s window=%d min_frames=%d psi_threshold=%g ks_threshold=%g "
                     "model_version=%s", ",".join(monitor.names), self.window, self.min_frames, psi, ks, version)
        elif state == NO_REFERENCE:
            log.info("event=drift_off reason=%r model_version=%s", state, version)
        else:
            log.error("event=drift_off reason=%r model_version=%s", state, version)
        return ModelDrift(version, monitor, state)

    def _follow(self, batch: FinishedBatch) -> ModelDrift:
        """The drift of the model that ran ``batch``: switched to it when it is a new version (a swap)."""
        if not self._new_model(batch):
            return self.drift
        assert batch.metadata is not None
        log.info("event=feedback_model_changed model_version=%s previous=%s: drift windows restart against "
                 "the new model's reference", batch.model_version, self.drift.model_version)
        self.drift = self._drift_for(batch.metadata, batch.model_version)
        return self.drift

    def _new_model(self, batch: FinishedBatch) -> bool:
        """Whether ``batch`` ran on another version than the one drift follows now."""
        return bool(batch.metadata is not None and batch.model_version
                    and batch.model_version != self.drift.model_version)

    # ------------------------------------------------------------------ per batch

    def submit(self, batch: FinishedBatch) -> None:
        """Hands a batch to the feedback thread; returns at once (the batcher's ``on_batch`` hook).

        A batch of a new model version is always handed on (when there is room), even when the
        current model needs no per-batch work: the new one may carry a drift reference.
        """
        if self._closed or not (self.active or self._new_model(batch)):
            return
        if not self._slots.acquire(blocking=False):
            self._skipped(len(batch.camera_ids))
            return
        try:
            self._thread.submit(self._process, batch)
        except RuntimeError:  # shut down between the check and the submit
            self._slots.release()

    def _skipped(self, frames: int) -> None:
        with self._lock:
            self.skipped_batches += 1
            now = time.monotonic()
            report = now - self._last_skip_log >= SKIP_LOG_INTERVAL
            if report:
                self._last_skip_log = now
        if report:
            log.warning("event=feedback_behind skipped_batches=%d frames=%d: drift statistics and capture fall "
                        "behind inference; skipping batches (answers are unaffected)", self.skipped_batches, frames)

    def _process(self, batch: FinishedBatch) -> None:
        start = time.perf_counter()
        try:
            monitor = self._follow(batch).monitor
            if monitor is not None:
                try:
                    monitor.observe_batch(batch.camera_ids, batch.frames, batch.result.counts)
                except Exception:  # noqa: BLE001 - drift must never take the server down
                    log.exception("event=drift_error batch_size=%d", len(batch.camera_ids))
            if self.writer is not None:
                try:
                    self._capture(batch)
                except Exception:  # noqa: BLE001 - nor must capture
                    log.exception("event=capture_error batch_size=%d", len(batch.camera_ids))
        finally:
            self._slots.release()
            if self._metrics is not None:
                self._metrics.feedback_seconds.observe(time.perf_counter() - start)

    def _capture(self, batch: FinishedBatch) -> None:
        assert self.writer is not None
        requests = batch.sources
        now = time.time_ns()

        def frame_of(i: int) -> Any:
            request = requests[i]
            # The camera's own bytes when it sent JPEG/PNG; a raw frame as the model saw it (gray).
            return request.encoded_image if request.WhichOneof("image") == "encoded_image" else batch.frames[i]

        self.writer.offer_batch(
            frame_of,
            camera_ids=batch.camera_ids,
            frame_ids=[r.frame_id for r in requests],
            time_ns=lambda i: requests[i].captured_at_unix_ns or now,
            model_version=batch.model_version or self.model_version,
            rles=batch.rles,
            counts=batch.result.counts,
            present=batch.result.present,
            min_areas=batch.metadata.min_areas if batch.metadata is not None else None,
        )

    def close(self) -> None:
        """Finishes the queued batches, then closes the capture writer (writing what it holds)."""
        self._closed = True
        self._thread.shutdown(wait=True)
        if self.writer is not None:
            self.writer.close()

    # ------------------------------------------------------------------ reporting

    def status(self, camera_id: str = "") -> pb.LineStatus:
        """The ``GetLineStatus`` answer: every camera (or the one asked for), thresholds, capture.

        ``model_version`` names the model whose reference the drift scores are against.
        """
        drift = self.drift  # once: a swap may replace it meanwhile
        monitor = drift.monitor
        status = pb.LineStatus(
            drift_enabled=monitor is not None,
            drift_state=drift.state,
            psi_threshold=monitor.psi_threshold if monitor else self.psi_threshold,
            ks_threshold=monitor.ks_threshold if monitor else self.ks_threshold,
            drift_window=self.window,
            drift_min_frames=self.min_frames,
            model_version=drift.model_version,
            feedback_skipped_batches=self.skipped_batches,
        )
        if monitor is not None:
            status.statistics.extend(monitor.names)
            cameras = list(monitor.status().values())
            if camera_id:
                cameras = [c for c in cameras if c.camera_id == camera_id]
            status.cameras_tracked = monitor.cameras
            shown = reported_cameras(cameras, self.max_status_cameras)
            status.cameras_omitted = len(cameras) - len(shown)
            for camera in shown:
                _add_camera(status, camera)
        capture = status.capture
        capture.enabled = self.writer is not None
        if self.writer is not None:
            c = self.writer.counters()
            capture.directory = str(self.writer.directory)
            capture.policy = str(self.writer.policy)
            capture.quota_bytes = self.writer.quota_bytes
            for name in ("offered", "selected", "written", "skipped_queue_full", "skipped_quota", "skipped_error",
                         "bytes_used", "queued"):
                setattr(capture, name, c[name])
        return status


def reported_cameras(cameras: list[CameraDrift], limit: int) -> list[CameraDrift]:
    """At most ``limit`` cameras, the ones over a threshold first, then the most recently seen
    (``cameras`` comes least recently seen first), so a bounded answer keeps what matters."""
    ranked = sorted(enumerate(cameras), key=lambda item: (not item[1].over, -item[0]))
    return [camera for _, camera in ranked[:limit]]


def _add_camera(status: pb.LineStatus, camera: CameraDrift) -> None:
    over = set(camera.over)
    entry = status.cameras.add(
        camera_id=camera.camera_id, frames_seen=camera.frames_seen, window_fill=camera.window_fill,
        scored=camera.scores is not None, over_threshold=[f"{s}/{k}" for s, k in camera.over],
    )
    for name, scores in (camera.scores or {}).items():
        score = entry.scores.add(
            statistic=name, psi=scores["psi"], psi_over_threshold=(name, "psi") in over,
            ks_over_threshold=(name, "ks") in over,
        )
        if scores["ks"] is not None:
            score.ks = scores["ks"]


class LineFeedbackCollector:
    """Prometheus series read from the line feedback at scrape time (nothing to keep in step).

    ``inspection_drift_model{model_version}`` (1 for the version the drift series are against),
    ``inspection_drift_score{camera,statistic,score}``, ``inspection_drift_over_threshold{...}``
    (1 while over), ``inspection_drift_threshold{score}``, ``inspection_drift_enabled``,
    ``inspection_drift_window_frames{camera}``, ``inspection_drift_frames_total{camera}``,
    ``inspection_capture_total{outcome}`` (written, skipped_queue_full, skipped_quota,
    skipped_error, not_selected), ``inspection_capture_queued``, ``inspection_capture_bytes``,
    ``inspection_capture_quota_bytes`` and ``inspection_feedback_skipped_batches_total``.

    Label cardinality is bounded: at most ``max_cameras`` cameras get a ``camera`` label of their
    own (a camera keeps its label while the monitor tracks it; a free label goes to the next new
    camera); the rest are aggregated as ``camera="other"``: frames summed, each score the largest
    among them, over-threshold 1 when any of them is over.

    Args:
        source: returns the server's current :class:`LineFeedback` (None before the model loads).
        max_cameras: cameras with a label of their own (``ServerConfig.max_metric_cameras``).
    """

    def __init__(self, source: Callable[[], LineFeedback | None],
                 max_cameras: int = ServerConfig.max_metric_cameras) -> None:
        if max_cameras < 1:
            raise ValueError(f"max_cameras must be >= 1, got {max_cameras}")
        self._source = source
        self.max_cameras = max_cameras
        self._labelled: dict[str, None] = {}  # insertion-ordered set, read and written under _lock
        self._lock = threading.Lock()

    def _labels(self, cameras: list[str]) -> dict[str, str]:
        """camera id -> its label (itself, or OTHER_CAMERA)."""
        with self._lock:
            tracked = set(cameras)
            self._labelled = {c: None for c in self._labelled if c in tracked}
            for camera in cameras:
                if len(self._labelled) >= self.max_cameras:
                    break
                self._labelled.setdefault(camera, None)
            return {c: c if c in self._labelled else OTHER_CAMERA for c in cameras}

    def _drift_families(self, monitor: DriftMonitor) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        thresholds = GaugeMetricFamily("inspection_drift_threshold", "Drift score thresholds", labels=["score"])
        thresholds.add_metric(["psi"], monitor.psi_threshold)
        thresholds.add_metric(["ks"], monitor.ks_threshold)
        cameras = monitor.status()
        labels = self._labels(list(cameras))
        fill: dict[str, float] = {}
        seen: dict[str, float] = {}
        scores: dict[tuple[str, str, str], float] = {}
        over: dict[tuple[str, str, str], float] = {}
        for camera in cameras.values():
            label = labels[camera.camera_id]
            fill[label] = fill.get(label, 0) + camera.window_fill
            seen[label] = seen.get(label, 0) + camera.frames_seen
            flagged = set(camera.over)
            for name, values in (camera.scores or {}).items():
                for kind, value in values.items():
                    if value is not None:
                        key = (label, name, kind)
                        scores[key] = max(scores.get(key, value), value)
                        over[key] = max(over.get(key, 0.0), 1.0 if (name, kind) in flagged else 0.0)
        score_family = GaugeMetricFamily(
            "inspection_drift_score", "Drift of a camera's rolling window against the model's reference "
            "(psi: population stability index, ks: KS statistic)", labels=["camera", "statistic", "score"],
        )
        over_family = GaugeMetricFamily(
            "inspection_drift_over_threshold", "1 while a drift score is over its threshold",
            labels=["camera", "statistic", "score"],
        )
        for key, value in scores.items():
            score_family.add_metric(list(key), value)
            over_family.add_metric(list(key), over[key])
        fill_family = GaugeMetricFamily("inspection_drift_window_frames", "Frames in a camera's drift window",
                                        labels=["camera"])
        seen_family = CounterMetricFamily("inspection_drift_frames", "Frames a camera's drift monitor has seen",
                                          labels=["camera"])
        for label in fill:
            fill_family.add_metric([label], fill[label])
            seen_family.add_metric([label], seen[label])
        tracked = GaugeMetricFamily("inspection_drift_cameras", "Cameras the drift monitor tracks")
        tracked.add_metric([], len(cameras))
        evicted = CounterMetricFamily("inspection_drift_cameras_evicted",
                                      "Cameras dropped by the drift monitor to make room for new ones")
        evicted.add_metric([], monitor.evicted)
        yield from (thresholds, score_family, over_family, fill_family, seen_family, tracked, evicted)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        feedback = self._source()
        drift = feedback.drift if feedback is not None else None
        monitor = drift.monitor if drift is not None else None
        enabled = GaugeMetricFamily("inspection_drift_enabled",
                                    "1 when the model carries a drift reference and drift is monitored")
        enabled.add_metric([], 1.0 if monitor is not None else 0.0)
        yield enabled
        if feedback is None or drift is None:
            return
        model = GaugeMetricFamily("inspection_drift_model", "1 for the model version whose drift reference the "
                                  "drift series are against (the model of the latest batch)", labels=["model_version"])
        model.add_metric([drift.model_version], 1.0)
        yield model
        if monitor is not None:
            yield from self._drift_families(monitor)
        writer = feedback.writer
        if writer is not None:
            c = writer.counters()
            outcomes = CounterMetricFamily("inspection_capture", "Frames offered to capture, by outcome",
                                           labels=["outcome"])
            for name in CAPTURE_OUTCOMES:
                outcomes.add_metric([name], c[name])
            outcomes.add_metric(["not_selected"], c["offered"] - c["selected"])
            yield outcomes
            for name, help_text, value in (
                ("inspection_capture_queued", "Captures waiting for the writer", c["queued"]),
                ("inspection_capture_bytes", "Bytes in the capture folder (-1 until counted)", c["bytes_used"]),
                ("inspection_capture_quota_bytes", "Size limit of the capture folder", writer.quota_bytes),
            ):
                gauge = GaugeMetricFamily(name, help_text)
                gauge.add_metric([], value)
                yield gauge
        skipped = CounterMetricFamily("inspection_feedback_skipped_batches",
                                      "Batches whose drift statistics and capture were skipped: the feedback "
                                      "thread was behind")
        skipped.add_metric([], feedback.skipped_batches)
        yield skipped
