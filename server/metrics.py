"""Prometheus metrics of one inspection server, in its own registry.

A per-server ``CollectorRegistry`` (not the process-global one) lets several servers live in one
process (tests, ``bench stream``) without their series colliding.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Latencies from tens of microseconds (tiny CPU models) to seconds (a saturated CPU server).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The server's series: frames by status, batch sizes, latencies, in-flight frames, open streams, coils."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.frames = Counter(
            "inspection_frames", "Frames answered, by outcome (a gRPC status code name, lower case)",
            ["status"], registry=r,
        )
        self.batch_size = Histogram(
            "inspection_batch_size", "Frames per inference batch", buckets=BATCH_BUCKETS, registry=r,
        )
        self.decode_seconds = Histogram(
            "inspection_decode_seconds", "Frame decoding (JPEG/PNG or raw conversion)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_seconds = Histogram(
            "inspection_queue_seconds", "Time a decoded frame waited for its batch to start",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inference_seconds = Histogram(
            "inspection_inference_seconds", "Inference time per batch", buckets=LATENCY_BUCKETS, registry=r,
        )
        self.postprocess_seconds = Histogram(
            "inspection_postprocess_seconds", "Run-length encoding time per batch",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.total_seconds = Histogram(
            "inspection_total_seconds", "Frame read off the stream -> response ready",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inflight = Gauge(
            "inspection_inflight_frames", "Frames accepted and not yet answered", registry=r,
        )
        self.open_streams = Gauge("inspection_open_streams", "Open Inspect streams", registry=r)
        self.inflight_limit = Gauge(
            "inspection_inflight_limit", "Most frames in flight over all calls (--max-inflight): saturation "
            "is inspection_inflight_frames at this bound", registry=r,
        )
        self.serving = Gauge(
            "inspection_serving", "1 while health says SERVING (model loaded and warmed up, not draining), else 0",
            registry=r,
        )
        self.feedback_seconds = Histogram(
            "inspection_feedback_seconds", "Line feedback per batch (drift statistics and capture selection), "
            "on its own thread after the batch's frames were answered", buckets=LATENCY_BUCKETS, registry=r,
        )
        self.coil_frames = Counter(
            "inspection_coil_frames", "Frames read that carried a coil id and a strip position (coil_id, "
            "position_mm); frames with a wrong one are not counted", registry=r,
        )
        self._coil_series(r)
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def _coil_series(self, r: CollectorRegistry) -> None:
        """Coil tracking (``server serve --coil-db``): what was stored, what waits, what went wrong."""
        self.coil_frames_stored = Counter(
            "inspection_coil_frames_stored", "Coil frames committed to the coil database, spooled ones when drained "
            "(a resent frame counts again; the database keeps one)",
            registry=r,
        )
        self.coil_spool_frames = Gauge(
            "inspection_coil_spool_frames", "Coil frames waiting in the spool for the database", registry=r,
        )
        self.coil_spool_bytes = Gauge("inspection_coil_spool_bytes", "Bytes of the coil spool", registry=r)
        self.coil_late_frames = Counter(
            "inspection_coil_late_frames", "Frames that arrived for a closed coil (kept, not merged)", registry=r,
        )
        self.coil_db_errors = Counter(
            "inspection_coil_db_errors", "Coil database writes or reads that failed (unreachable, timed out)",
            registry=r,
        )
        self.coil_db_up = Gauge(
            "inspection_coil_db_up", "1 while the coil database takes writes, 0 while frames go to the spool",
            registry=r,
        )
        self.coil_refused_frames = Counter(
            "inspection_coil_refused_frames", "Frames answered UNAVAILABLE: the database was down and the spool "
            "full (the camera resends them)", registry=r,
        )
        self.coil_commit_seconds = Histogram(
            "inspection_coil_commit_seconds", "Storing a batch's coil frames before its answers (database or "
            "spool)", buckets=LATENCY_BUCKETS, registry=r,
        )
        self.coil_close_seconds = Histogram(
            "inspection_coil_close_seconds", "Closing a coil: merging its records and storing them and its summary",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.alarms_raised = Counter(
            "inspection_alarms_raised", "Alarms raised, per alarm rule (server serve --grading FILE, alarms:)",
            ["rule"], registry=r,
        )
        self.alarms_unacknowledged = Gauge(
            "inspection_alarms_unacknowledged", "Alarms raised and not yet acknowledged (console, OPC UA)", registry=r,
        )
        self.line_watch_shed = Counter(
            "inspection_line_watch_shed_frames", "Coil frames left out of the live line view (alarms, grades so far) "
            "because the coil watch fell behind; the records at close are whole", registry=r,
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Starts the ``/metrics`` HTTP endpoint (port 0 picks a free port) and returns its port."""
        self._http, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
