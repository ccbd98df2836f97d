"""Shadow runs: the candidate model on a share of live frames, off the hot path, measured against
production.

After a batch's frames are answered (a batch listener of the server), :meth:`ShadowRunner.submit`
draws ``share`` of its frames and hands them to the shadow thread, a thread of its own at a lower OS
priority. When that thread is behind (``max_queued`` batches waiting) the frames are skipped and
counted, never queued without bound: the production answers never wait for a shadow run. When
production itself has no spare capacity (``busy``: a full batch of frames is waiting for the
inference thread) the frames are skipped too, before and again just before the candidate would run:
on a machine without spare cores the shadow costs production nothing but the draw. Shadow answers
are never sent to cameras.

Per class the runner measures the candidate against production on the same frames: presence
agreement, mask Dice on the frames where either found the class, the mean absolute pixel-count
difference, and the candidate's own latency (:class:`ShadowStatus`, in Prometheus and the
``GetModels`` RPC). The candidate can change at any time (load, unload, promote): :meth:`detach`
returns only once no shadow run uses the old one. With the capture policy ``disagree`` a frame where
the candidate disagrees with production on a class's presence is saved with the candidate's
predictions (:func:`capture_disagreement`) for review.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.backends.base import Backend, InspectionResult

if TYPE_CHECKING:
    from server.batcher import FinishedBatch
    from server.capture import CaptureWriter

log = logging.getLogger(__name__)

#: Batches waiting for the shadow thread before new frames are skipped.
DEFAULT_SHADOW_QUEUE = 2
_NICE = 10  # the shadow thread's OS priority below the server's (Linux: per thread)


@dataclass
class ClassAgreement:
    """One class's agreement of the candidate with production, summed over the frames compared."""

    name: str
    presence_agreed: int = 0  # frames where both found the class present, or both absent
    dice_frames: int = 0  # frames where either found it present
    dice_sum: float = 0.0
    count_difference_sum: int = 0  # |candidate - production| pixels, over every frame compared


@dataclass
class ShadowStatus:
    """The shadow run of one candidate version: what was compared, skipped, and how they agree."""

    version: str
    share: float
    frames: int = 0
    skipped: int = 0
    disagreeing_frames: int = 0  # frames where some class's presence differs
    inference_s: float = 0.0  # the candidate's time over all frames compared
    classes: list[ClassAgreement] = field(default_factory=list)

    def presence_agreement(self, k: int) -> float:
        return self.classes[k].presence_agreed / self.frames if self.frames else 1.0

    def dice(self, k: int) -> float:
        c = self.classes[k]
        return c.dice_sum / c.dice_frames if c.dice_frames else 1.0

    def count_difference(self, k: int) -> float:
        return self.classes[k].count_difference_sum / self.frames if self.frames else 0.0

    @property
    def latency_s(self) -> float:
        """The candidate's mean inference time per frame."""
        return self.inference_s / self.frames if self.frames else 0.0


def compare(production: InspectionResult, candidate: InspectionResult) -> dict[str, np.ndarray]:
    """Per-frame, per-class agreement of two results on the same frames (``[N, C]`` arrays):
    ``agreed`` presence, ``either`` present, mask ``dice`` (1 where both masks are empty) and
    absolute ``difference`` of pixel counts."""
    both = np.logical_and(production.masks, candidate.masks).sum(axis=(2, 3))
    total = production.counts.astype(np.int64) + candidate.counts
    dice = np.where(total > 0, 2.0 * both / np.maximum(total, 1), 1.0)
    return {
        "agreed": production.present == candidate.present,
        "either": production.present | candidate.present,
        "dice": dice,
        "difference": np.abs(production.counts.astype(np.int64) - candidate.counts),
    }


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: the thread runs at normal priority
        log.debug("event=shadow_priority_unchanged")


class ShadowRunner:
    """Runs the attached candidate on ``share`` of the frames of every finished batch.

    Args:
        share: the share of live frames to shadow, 0..1 (0: off; :meth:`set_share` changes it).
        seed: seeds the draws.
        max_queued: batches waiting for the shadow thread before frames are skipped.
        on_disagree: called on the shadow thread with (candidate version, batch, frame index, the
            candidate's result for the frame) for each frame where a class's presence differs.
        busy: True while production has no spare capacity (frames waiting for inference): the shadow
            frames are skipped then; None: never busy.
    """

    def __init__(self, share: float, seed: int = 0, max_queued: int = DEFAULT_SHADOW_QUEUE,
                 on_disagree: Callable[[str, FinishedBatch, int, InspectionResult], None] | None = None,
                 busy: Callable[[], bool] | None = None) -> None:
        self.share = check_share(share)
        self._busy = busy or (lambda: False)
        self._rng = np.random.default_rng(seed)
        self._max_queued = max_queued
        self._on_disagree = on_disagree
        self._candidate: tuple[str, Backend] | None = None  # (version, backend)
        self._status: ShadowStatus | None = None
        self._run_lock = threading.Lock()  # held while the candidate runs: detach() waits on it
        self._counts = threading.Lock()
        self._queued = 0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="shadow", initializer=_lower_priority)

    def set_share(self, share: float) -> None:
        self.share = check_share(share)
        if self._status is not None:
            self._status.share = self.share

    def attach(self, version: str, backend: Backend) -> None:
        """Shadows candidate ``version`` from now on, with fresh statistics (per class of the candidate)."""
        names = backend.metadata.class_names
        with self._counts:
            self._candidate = (version, backend)
            self._status = ShadowStatus(version, self.share, classes=[ClassAgreement(n) for n in names])

    async def detach(self) -> None:
        """Stops shadowing; returns once no shadow run uses the candidate any more."""
        def release() -> None:
            with self._run_lock, self._counts:
                self._candidate = None

        await asyncio.get_running_loop().run_in_executor(None, release)

    def status(self) -> ShadowStatus | None:
        """A copy of the current candidate's statistics, None without a candidate."""
        with self._counts:
            if self._status is None or self._candidate is None:
                return None
            s = self._status
            return ShadowStatus(s.version, s.share, s.frames, s.skipped, s.disagreeing_frames, s.inference_s,
                                [ClassAgreement(**vars(c)) for c in s.classes])

    def submit(self, batch: FinishedBatch) -> None:
        """A batch listener: draws this batch's shadow frames and queues them, or counts them skipped."""
        if self.share <= 0 or self._candidate is None:
            return
        chosen = np.flatnonzero(self._rng.random(len(batch.camera_ids)) < self.share)
        if not len(chosen):
            return
        with self._counts:
            if self._status is None:
                return
            if self._queued >= self._max_queued or self._busy():
                self._status.skipped += len(chosen)
                return
            self._queued += 1
        self._thread.submit(self._run, batch, chosen)

    def close(self) -> None:
        """Waits for the queued shadow runs and stops the thread."""
        self._thread.shutdown(wait=True)

    def _run(self, batch: FinishedBatch, chosen: np.ndarray) -> None:
        try:
            with self._run_lock:
                if self._candidate is None:
                    return
                if self._busy():  # production got busy while this batch waited: it goes first
                    with self._counts:
                        if self._status is not None:
                            self._status.skipped += len(chosen)
                    return
                version, backend = self._candidate
                start = time.perf_counter()
                result = backend.infer(np.ascontiguousarray(batch.frames[chosen]))
                elapsed = time.perf_counter() - start
            if result.counts.shape != batch.result.counts[chosen].shape:  # other classes (--allow-class-change)
                with self._counts:
                    if self._status is not None:
                        self._status.skipped += len(chosen)
                return
            self._record(version, batch.result.subset(chosen), result, elapsed, batch, chosen)
        except Exception:  # noqa: BLE001 - a failing shadow run must not stop the shadow thread
            log.exception("event=shadow_error frames=%d", len(chosen))
        finally:
            with self._counts:
                self._queued -= 1

    def _record(self, version: str, production: InspectionResult, candidate: InspectionResult, elapsed: float,
                batch: FinishedBatch, chosen: np.ndarray) -> None:
        agreement = compare(production, candidate)
        disagree = np.flatnonzero(~agreement["agreed"].all(axis=1))
        if self._on_disagree is not None:  # before the counts: a frame counted is a frame fully handled
            for i in disagree:
                try:
                    self._on_disagree(version, batch, int(chosen[i]), candidate.subset(slice(int(i), int(i) + 1)))
                except Exception:  # noqa: BLE001 - capture is best effort; the comparison still counts
                    log.exception("event=shadow_capture_error")
        with self._counts:
            status = self._status
            if status is None or status.version != version:
                return
            status.frames += len(chosen)
            status.inference_s += elapsed
            status.disagreeing_frames += len(disagree)
            for k, c in enumerate(status.classes):
                c.presence_agreed += int(agreement["agreed"][:, k].sum())
                c.dice_frames += int(agreement["either"][:, k].sum())
                c.dice_sum += float(agreement["dice"][:, k][agreement["either"][:, k]].sum())
                c.count_difference_sum += int(agreement["difference"][:, k].sum())


def capture_disagreement(writer: CaptureWriter | None, version: str, batch: FinishedBatch, i: int,
                         candidate: InspectionResult, min_areas: Sequence[int] | None = None) -> bool:
    """Offers frame ``i`` of ``batch`` to ``writer`` with candidate ``version``'s predictions when its
    policy has ``disagree``; the reason names the classes whose presence differs. Never blocks.

    ``min_areas`` are the candidate's (default: the writer's)."""
    if writer is None or not writer.policy.disagree:
        return False
    request = batch.sources[i]
    # The camera's own bytes when it sent JPEG/PNG; a raw frame as the model saw it (gray).
    frame = request.encoded_image if request.WhichOneof("image") == "encoded_image" else batch.frames[i]
    classes = np.flatnonzero(candidate.present[0] != batch.result.present[i]) + 1
    time_ns = request.captured_at_unix_ns or time.time_ns()
    return writer.offer(
        frame, camera_id=batch.camera_ids[i], frame_id=request.frame_id, time_ns=time_ns, model_version=version,
        rles=candidate.rle()[0], counts=candidate.counts[0], present=candidate.present[0],
        reason="disagree:" + ",".join(map(str, classes)),
        image_id=f"{batch.camera_ids[i]}_{int(request.frame_id):012d}_{int(time_ns)}_shadow-{version}",
        min_areas=min_areas,
    )


def check_share(share: float) -> float:
    """``share`` if it is a share of frames (0..1), else ValueError naming ``--shadow-share``."""
    if not (isinstance(share, (int, float)) and 0.0 <= share <= 1.0):
        raise ValueError(f"shadow share (--shadow-share) must lie in 0..1, got {share}")
    return float(share)


class ShadowCollector:
    """The shadow run's statistics for Prometheus, read at each scrape."""

    def __init__(self, runner: Callable[[], ShadowRunner | None]) -> None:
        self._runner = runner

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        runner = self._runner()
        status = runner.status() if runner is not None else None
        if status is None:
            return
        frames = CounterMetricFamily("inspection_shadow_frames", "Frames the candidate ran in shadow",
                                     labels=["version"])
        frames.add_metric([status.version], status.frames)
        skipped = CounterMetricFamily("inspection_shadow_skipped_frames",
                                      "Frames drawn for the shadow run and skipped because it was behind",
                                      labels=["version"])
        skipped.add_metric([status.version], status.skipped)
        latency = GaugeMetricFamily("inspection_shadow_latency_seconds", "The candidate's mean inference time per frame",
                                    labels=["version"])
        latency.add_metric([status.version], status.latency_s)
        yield from (frames, skipped, latency)
        families = {
            "presence_agreement": ("Share of shadowed frames where the candidate agrees on the class's presence",
                                   status.presence_agreement),
            "dice": ("Mean mask Dice of candidate and production where either found the class", status.dice),
            "pixel_count_difference": ("Mean absolute pixel-count difference of candidate and production",
                                       status.count_difference),
        }
        for name, (text, value) in families.items():
            family = GaugeMetricFamily(f"inspection_shadow_{name}", text, labels=["version", "defect_class"])
            for k, c in enumerate(status.classes):
                family.add_metric([status.version, c.name], value(k))
            yield family


__all__ = ["ClassAgreement", "ShadowCollector", "ShadowRunner", "ShadowStatus", "capture_disagreement", "check_share",
           "compare"]
