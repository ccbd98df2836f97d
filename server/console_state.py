"""The console's JSON state: what the page shows, read from the server's own counters and metrics.

Kept apart from :mod:`server.console` (the web server and the frame buffer) so that what the page
says is one set of small functions, each reading one source: the camera buffers, the Prometheus
series of :class:`server.metrics.ServerMetrics`, the line feedback's ``LineStatus``, the model's
``ModelInfo``, the model manager's roles, shadow run and audit log.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from server.metrics import ServerMetrics
    from server.models import ModelManager
    from server.service import InspectionServer

Load = Sequence[tuple[float, int, dict[str, int], np.ndarray]]  # (monotonic, answered, frames per camera, buckets)


def latency_buckets(metrics: ServerMetrics) -> np.ndarray:
    """Cumulative counts of ``inspection_total_seconds`` per bucket (``+Inf`` last)."""
    samples = metrics.total_seconds.collect()[0].samples
    return np.array([s.value for s in samples if s.name.endswith("_bucket")], np.float64)


def bucket_bounds(metrics: ServerMetrics) -> list[float]:
    samples = metrics.total_seconds.collect()[0].samples
    return [float(s.labels["le"]) for s in samples if s.name.endswith("_bucket")]


def quantile_from_buckets(bounds: Sequence[float], counts: np.ndarray, q: float) -> float | None:
    """Upper bound of the histogram bucket holding quantile ``q`` of cumulative ``counts`` (None: no data).

    The page says "<= x ms": a bucket's upper bound is all a Prometheus histogram knows."""
    total = counts[-1] if len(counts) else 0
    if total <= 0:
        return None
    index = int(np.searchsorted(counts, q * total, side="left"))
    return float(bounds[min(index, len(bounds) - 1)])


def _rate(load: Load, value: Any) -> float | None:
    if len(load) < 2:
        return None
    span = load[-1][0] - load[0][0]
    return None if span <= 0 else (value(load[-1]) - value(load[0])) / span


def server_state(server: InspectionServer, load: Load) -> dict[str, Any]:
    """Load, errors, model, drift and capture of the server."""
    metrics = server.metrics
    p95 = None
    if len(load) >= 2:
        p95 = quantile_from_buckets(bucket_bounds(metrics), load[-1][3] - load[0][3], 0.95)
    errors = {}
    for sample in metrics.frames.collect()[0].samples:
        status = sample.labels.get("status")
        if sample.name.endswith("_total") and status != "ok" and sample.value:
            errors[status] = int(sample.value)
    stats = server.stats()
    return {
        "phase": "serving" if server.backend is not None and server.feedback is not None else "loading",
        "load": {
            "frames_per_s": _rate(load, lambda s: s[1]),
            "p95_latency_s": p95,
            "inflight": stats["inflight"],
            "max_inflight": server.config.max_inflight,
            "open_streams": stats["open_streams"],
            "answered": stats["answered"],
            "errors": errors,
        },
        **model_state(server),
        **line_state(server),
    }


def model_state(server: InspectionServer) -> dict[str, Any]:
    from engine.overlay import class_colour_hex

    backend = server.backend
    if backend is None:
        return {"model": None, "classes": []}
    meta = backend.metadata
    classes = [
        {"id": k, "name": name, "colour": class_colour_hex(i), "threshold": meta.thresholds[i],
         "min_area": meta.min_areas[i]}
        for i, (k, name) in enumerate(zip(meta.class_ids, meta.class_names))
    ]
    version = server.info.model_version if server.info is not None else meta.model_version  # a repository's name
    model = {"version": version, "backend": backend.name, "precision": backend.precision,
             "device": backend.device, "encoder": meta.encoder, "folds": meta.folds,
             "input": [meta.input_height, meta.input_width]}
    return {"model": model, "classes": classes}


def models_state(manager: ModelManager | None) -> dict[str, Any]:
    """Production, the candidate, its shadow run's agreement per class and the audit log's last entries."""
    if manager is None:
        return {"models": None}
    shadow = manager.shadow.status()
    agreement = None
    if shadow is not None:
        agreement = {
            "share": shadow.share, "frames": shadow.frames, "skipped": shadow.skipped,
            "disagreeing_frames": shadow.disagreeing_frames, "latency_s": shadow.latency_s,
            "classes": [{"name": c.name, "presence": shadow.presence_agreement(k), "dice": shadow.dice(k),
                         "pixel_difference": shadow.count_difference(k)} for k, c in enumerate(shadow.classes)],
        }
    roles = manager.repository.roles
    audit = [{"time": e.time, "action": e.action, "version": e.version, "who": e.who, "outcome": e.outcome,
              "why": e.why} for e in manager.recent_audit]
    return {"models": {"production": roles.production, "candidate": manager.candidate.version if manager.candidate
                       else None, "rollback_to": roles.history[-1] if roles.history else None,
                       "shadow": agreement, "audit": audit}}


def line_state(server: InspectionServer) -> dict[str, Any]:
    """Drift per camera and statistic, and the capture counters (the ``GetLineStatus`` answer)."""
    if server.feedback is None:
        return {"drift": None, "capture": None}
    status = server.line_status()
    cameras = {}
    for camera in status.cameras:
        cameras[camera.camera_id] = {
            "scored": camera.scored, "window_fill": camera.window_fill,
            "statistics": [
                {"name": s.statistic, "psi": s.psi, "ks": s.ks if s.HasField("ks") else None,
                 "over": s.psi_over_threshold or s.ks_over_threshold}
                for s in camera.scores
            ],
        }
    drift = {"enabled": status.drift_enabled, "state": status.drift_state, "window": status.drift_window,
             "min_frames": status.drift_min_frames, "psi_threshold": status.psi_threshold,
             "ks_threshold": status.ks_threshold, "cameras": cameras}
    c = status.capture
    capture = {"enabled": c.enabled}
    if c.enabled:
        capture.update({name: getattr(c, name) for name in (
            "policy", "directory", "offered", "selected", "written", "queued", "skipped_queue_full",
            "skipped_quota", "skipped_error", "bytes_used", "quota_bytes")})
    return {"drift": drift, "capture": capture, "feedback_skipped_batches": status.feedback_skipped_batches}


def _shot_state(shot: Any, kind: str) -> dict[str, Any]:
    present = shot.present.tolist()
    counts = shot.counts.tolist()
    return {
        "seq": shot.seq, "frame_id": shot.frame_id, "time": shot.time,
        "image": f"/frames/{shot.seq}.jpg", "thumb": f"/thumbs/{shot.seq}.jpg" if kind == "thumb" else None,
        "counts": counts, "present": present, "model_version": shot.model_version,
        "discarded": [bool(n > 0 and not p) for n, p in zip(counts, present)],
    }


def camera_state(camera: Any, thumbnails: Sequence[Any], bucket_s: float, history_s: float, load: Load) -> dict[str, Any]:
    """One camera's card (a ``server.console._Camera``): the frame shown, ``thumbnails`` (oldest
    first, listed newest first), totals, defect-rate history in buckets of ``bucket_s`` over ``history_s``."""
    since = time.time() - history_s  # a camera that stopped sending keeps its old buckets until its next frame
    history = [{"start": b[0], "frames": b[1], "defects": b[2].tolist()} for b in camera.buckets if b[0] >= since]
    return {
        "id": camera.camera_id,
        "frames": camera.frames,
        "frames_per_s": _rate(load, lambda s: s[2].get(camera.camera_id, 0)),
        "defective_frames": camera.defective_frames.tolist(),
        "latest": None if camera.shown is None else _shot_state(camera.shown, "frame"),
        "thumbnails": [_shot_state(s, "thumb") for s in reversed(thumbnails)],
        "rate": {"bucket_s": bucket_s, "history_s": history_s, "buckets": history},
    }
