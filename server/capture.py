"""Capture of line frames for retraining: a policy that picks frames, and an asynchronous writer.

``server serve --capture-dir DIR --capture uncertain,defects,sample:0.01 --capture-quota-gb 5``
saves chosen frames with the model's predictions as a Severstal-format folder
(:mod:`server.capture_folder` owns its layout), which trains as it is after review.

Capture never slows or loses inference. :meth:`CaptureWriter.offer` only decides and enqueues
(a bounded queue); one writer thread encodes and writes. When the queue is full, the quota would
be exceeded, or the disk fails, the capture is skipped and counted, and the frame's answer is
unaffected. The quota counts every byte in DIR, including what earlier runs left there.

A capture is written image-last: the image goes to a hidden temporary file, the CSV rows are
appended, then the image is renamed into place. A crash in between leaves rows naming a missing
image, which the next start removes (the trainer would otherwise refuse the folder), rather than
an image without rows, which the trainer would silently read as defect-free.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.decode import image_format
from engine.files import atomic_path
from server.capture_folder import HEADERS, IMAGES_DIR, Capture, folder_bytes, repair_csv
from server.capture_policy import CapturePolicy
from server.config import DEFAULT_CAPTURE_QUEUE, CaptureConfig, check_capture_limits

log = logging.getLogger(__name__)

RETRY_SECONDS = 30.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


_STOP = object()


def _image_suffix(data: bytes) -> str | None:
    """The file suffix for encoded frame bytes (by content, as the server decodes them), or None."""
    return {"png": ".png", "jpeg": ".jpg"}.get(image_format(data))


class CaptureWriter:
    """Saves chosen frames to a Severstal-format folder from its own thread, never blocking.

    Counters (plain ints, read any time; the server exports them as metrics):
    ``offered`` frames offered, ``selected`` chosen by the policy, ``written`` saved,
    ``skipped_queue_full``, ``skipped_quota``, ``skipped_error`` (disk or folder failures, frames
    that are neither JPEG/PNG bytes nor uint8 arrays), and ``bytes_used`` (bytes in the folder, -1
    until the writer has counted them at start).

    Args:
        directory: the capture folder (created if missing).
        policy: which frames to capture.
        min_areas: per-class minimum areas (``ModelMetadata.min_areas``), for the "uncertain" rule.
        quota_bytes: the folder's size limit, existing content included.
        queue_size: captures waiting for the writer; memory is at most this many frames.
        seed: seeds the "sample" draws, so a run's choice is reproducible.
        retry_seconds: after the folder could not be prepared, offers are skipped without
            queueing for this long before the writer tries again.
        start: start the writer thread now (tests hold it back with False and call :meth:`start`).
    """

    @classmethod
    def from_config(cls, config: CaptureConfig, min_areas: Sequence[int]) -> CaptureWriter:
        """The writer ``server serve --capture*`` asks for (its thread prepares the folder)."""
        return cls(config.directory, config.policy, min_areas=min_areas, quota_bytes=config.quota_bytes,
                   queue_size=config.queue_size, seed=config.seed)

    def __init__(
        self,
        directory: str | Path,
        policy: CapturePolicy,
        min_areas: Sequence[int],
        quota_bytes: int,
        queue_size: int = DEFAULT_CAPTURE_QUEUE,
        seed: int = 0,
        retry_seconds: float = RETRY_SECONDS,
        start: bool = True,
    ) -> None:
        check_capture_limits(quota_bytes, queue_size)
        if not min_areas or any(a < 0 for a in min_areas):
            raise ValueError(f"min_areas must be one non-negative area per class, got {list(min_areas)}")
        self.directory = Path(directory)
        self.policy = policy
        self.min_areas = tuple(int(a) for a in min_areas)
        self.num_classes = len(self.min_areas)
        self.quota_bytes = int(quota_bytes)
        self.queue_size = queue_size
        self.retry_seconds = float(retry_seconds)
        self.offered = 0
        self.selected = 0
        self.written = 0
        self.skipped_queue_full = 0
        self.skipped_quota = 0
        self.skipped_error = 0
        self.bytes_used = -1
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # counters, the random draws, the failure state
        self._failed_until = 0.0
        self._last_png_bytes = 0
        self._closed = False
        self._files: dict[str, Any] = {}
        self._prepared = False
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        if start:
            self.start()

    # ------------------------------------------------------------------ caller side

    @property
    def skipped(self) -> int:
        """Captures chosen by the policy but not saved, for any reason."""
        return self.skipped_queue_full + self.skipped_quota + self.skipped_error

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "offered": self.offered, "selected": self.selected, "written": self.written,
                "skipped_queue_full": self.skipped_queue_full, "skipped_quota": self.skipped_quota,
                "skipped_error": self.skipped_error, "skipped": self.skipped, "bytes_used": self.bytes_used,
                "queued": self._queue.qsize(),
            }

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def select(self, counts: np.ndarray, present: np.ndarray, min_areas: Sequence[int] | None = None) -> list[str]:
        """The policy's reasons for a batch ``[N, C]`` (``""`` = not chosen); thread-safe.

        ``min_areas`` are those of the model that made the predictions (default: the writer's).
        """
        areas = self.min_areas if min_areas is None else tuple(int(a) for a in min_areas)
        with self._lock:
            return self.policy.reasons(counts, present, areas, self._rng)

    def offer(
        self,
        frame: bytes | bytearray | memoryview | np.ndarray,
        *,
        camera_id: str,
        frame_id: int,
        time_ns: int,
        model_version: str,
        rles: Sequence[str],
        counts: Sequence[int] | np.ndarray,
        present: Sequence[bool] | np.ndarray,
        reason: str | None = None,
        image_id: str | None = None,
        min_areas: Sequence[int] | None = None,
    ) -> bool:
        """Offers one inspected frame; returns True when it was queued for saving. Never blocks.

        Args:
            frame: the camera's original JPEG/PNG bytes, or the uint8 frame (``[H, W]`` gray or
                ``[H, W, 3]`` BGR; copied, so the caller may reuse its buffer).
            camera_id, frame_id, time_ns: where and when the frame was taken.
            model_version: the model that made the predictions.
            rles: one RLE per class, at the frame's resolution (``""`` = empty mask).
            counts, present: the model's per-class pixel counts and labels.
            reason: the policy's reason when the caller already ran :meth:`select` on the batch;
                None runs the policy on this frame here.
            image_id: the file name stem; default ``<camera>_<frame id>_<time>``. Unsafe characters
                become ``_``; the suffix follows the image format.
            min_areas: the minimum areas of the model that made the predictions, one per class
                (a hot swap may change them, or the classes); default: the writer's.
        """
        classes = len(self.min_areas if min_areas is None else min_areas)
        self._check_per_class(frame_id, rles, counts, present, classes)
        with self._lock:
            self.offered += 1
        if self._closed:
            return False
        if reason is None:
            reason = self.select(np.asarray(counts)[None], np.asarray(present)[None], min_areas)[0]
        if not reason:
            return False
        with self._lock:
            self.selected += 1
        kind = self._suffix_and_size(frame, camera_id, frame_id)
        if kind is None or not self._admits(kind[1]):
            return False
        # Copied only now, when it is going to the queue: the caller may reuse its buffers.
        payload = np.array(frame, copy=True, order="C") if isinstance(frame, np.ndarray) else bytes(frame)
        stem = _UNSAFE.sub("_", image_id if image_id is not None else f"{camera_id}_{int(frame_id):012d}_{int(time_ns)}")
        return self._enqueue(Capture(
            frame=payload, suffix=kind[0], stem=stem.strip("._") or "frame", camera_id=str(camera_id),
            frame_id=int(frame_id), time_ns=int(time_ns), model_version=str(model_version), reason=reason,
            rles=tuple(str(r) for r in rles), counts=tuple(int(c) for c in counts),
            present=tuple(bool(p) for p in present),
        ))

    @staticmethod
    def _check_per_class(frame_id: int, rles: Sequence[str], counts: Sequence[int] | np.ndarray,
                         present: Sequence[bool] | np.ndarray, num_classes: int) -> None:
        if len(rles) != num_classes or len(counts) != num_classes or len(present) != num_classes:
            raise ValueError(
                f"capture of frame {frame_id}: rles, counts and present need one entry per class "
                f"({num_classes}), got {len(rles)}, {len(counts)}, {len(present)}"
            )

    def _suffix_and_size(self, frame: bytes | bytearray | memoryview | np.ndarray, camera_id: str,
                         frame_id: int) -> tuple[str, int] | None:
        """The file suffix and (estimated) size of a frame to save; None, skipped and counted, for a
        frame that is neither JPEG/PNG bytes nor a uint8 gray or BGR array."""
        if isinstance(frame, np.ndarray):
            if frame.dtype != np.uint8 or not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)):
                self._skip_error(f"frame {frame_id} of camera {camera_id!r}: not a uint8 [H, W] or "
                                 f"[H, W, 3] array (got {frame.dtype} {list(frame.shape)})")
                return None
            return ".png", self._last_png_bytes  # the PNG size is known once encoded: estimate
        suffix = _image_suffix(bytes(frame[:8]))
        if suffix is None:
            self._skip_error(f"frame {frame_id} of camera {camera_id!r}: bytes are neither JPEG nor PNG")
            return None
        return suffix, len(frame)

    def _admits(self, size: int) -> bool:
        """Whether a capture of ``size`` bytes may be queued now: the folder is usable and the quota
        leaves room. Counts the skip when not."""
        with self._lock:
            if time.monotonic() < self._failed_until:
                self.skipped_error += 1
                return False
            if self.bytes_used >= 0 and self.bytes_used + size > self.quota_bytes:
                self.skipped_quota += 1
                return False
        return True

    def _enqueue(self, item: Capture) -> bool:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.skipped_queue_full += 1
            return False
        return True

    def offer_batch(
        self,
        frame_of: Callable[[int], bytes | bytearray | memoryview | np.ndarray],
        *,
        camera_ids: Sequence[str],
        frame_ids: Sequence[int],
        time_ns: Callable[[int], int],
        model_version: str,
        rles: Sequence[Sequence[str]],
        counts: np.ndarray,
        present: np.ndarray,
        min_areas: Sequence[int] | None = None,
    ) -> int:
        """Offers one inference batch: the policy runs once over it, only chosen frames are fetched.

        Args:
            frame_of: frame ``i``'s original bytes or uint8 pixels (see :meth:`offer`); called only
                for chosen frames, so the caller need not materialise every frame's bytes.
            camera_ids, frame_ids: one per frame.
            time_ns: frame ``i``'s capture time (called for chosen frames only).
            rles: per frame, one RLE per class.
            counts, present: ``[N, C]`` the model's pixel counts and labels.
            min_areas: the minimum areas of the model that ran the batch (default: the writer's).

        Returns:
            How many frames were queued for saving.
        """
        n = len(camera_ids)
        if len(frame_ids) != n or len(rles) != n or len(counts) != n or len(present) != n:
            raise ValueError(
                f"capture batch: {n} camera ids, {len(frame_ids)} frame ids, {len(rles)} rles, "
                f"{len(counts)} counts and {len(present)} labels rows; expected one of each per frame"
            )
        reasons = self.select(counts, present, min_areas)
        chosen = [i for i, reason in enumerate(reasons) if reason]
        with self._lock:
            self.offered += n - len(chosen)  # offer() counts the chosen ones
        queued = 0
        for i in chosen:
            queued += self.offer(
                frame_of(i), camera_id=camera_ids[i], frame_id=frame_ids[i], time_ns=time_ns(i),
                model_version=model_version, rles=rles[i], counts=counts[i], present=present[i], reason=reasons[i],
                min_areas=min_areas,
            )
        return queued

    def _skip_error(self, message: str) -> bool:
        with self._lock:
            self.skipped_error += 1
        log.warning("capture skipped: %s", message)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Stops taking offers, writes what is queued (up to ``timeout`` seconds) and stops the thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("capture writer did not finish within %.0f s; %d queued captures are lost",
                            timeout, self._queue.qsize())
                return
        elif not self._queue.empty():
            log.warning("capture writer was never started; %d queued captures are dropped", self._queue.qsize())
        self._close_files()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        self._try_prepare()
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if not self._prepared and (time.monotonic() < self._failed_until or not self._try_prepare()):
                with self._lock:
                    self.skipped_error += 1
                continue
            try:
                self._write(item)
            except Exception:  # noqa: BLE001 - the writer thread must outlive any one capture
                log.exception("capture of frame %d from camera %r failed", item.frame_id, item.camera_id)
                with self._lock:
                    self.skipped_error += 1
        self._close_files()

    def _try_prepare(self) -> bool:
        try:
            self._prepare()
        except (OSError, ValueError) as exc:
            self._close_files()
            with self._lock:
                self._failed_until = time.monotonic() + self.retry_seconds
            log.error("capture folder %s is unusable, captures are skipped (retry in %.0f s): %s",
                      self.directory, self.retry_seconds, exc)
            return False
        with self._lock:
            self._failed_until = 0.0
        self._prepared = True
        return True

    def _prepare(self) -> None:
        images = self.directory / IMAGES_DIR
        images.mkdir(parents=True, exist_ok=True)
        for leftover in images.glob(".*.tmp"):
            leftover.unlink()
        present = {p.name for p in images.iterdir()}
        for name, header in HEADERS.items():
            path = self.directory / name
            repair_csv(path, header, present)
            self._files[name] = open(path, "ab")  # noqa: SIM115 - kept open for the writer's life
        used = folder_bytes(self.directory)
        with self._lock:
            self.bytes_used = used
        log.info("capturing %s to %s: %.3f of %.3f GB used", self.policy, self.directory, used / 1e9,
                 self.quota_bytes / 1e9)

    def _close_files(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass
        self._files = {}
        self._prepared = False

    def _write(self, item: Capture) -> None:
        images = self.directory / IMAGES_DIR
        if isinstance(item.frame, np.ndarray):
            import cv2

            ok, encoded = cv2.imencode(".png", item.frame)
            if not ok:
                self._skip_error(f"frame {item.frame_id} of camera {item.camera_id!r}: PNG encoding failed")
                return
            data = encoded.tobytes()
            self._last_png_bytes = len(data)
        else:
            data = item.frame
        image_id = item.stem + item.suffix
        n = 1
        while (images / image_id).exists():  # a camera's frame ids can restart; never overwrite
            n += 1
            image_id = f"{item.stem}-{n}{item.suffix}"
        rows = item.rows(image_id)
        need = len(data) + sum(len(b) for b in rows.values())
        with self._lock:
            if self.bytes_used + need > self.quota_bytes:
                self.skipped_quota += 1
                return
        sizes: dict[str, int] = {}
        try:
            # The image appears under its name only once its rows are written (a crash in between
            # leaves a hidden .tmp, removed on the next start).
            with atomic_path(images / image_id) as tmp:
                tmp.write_bytes(data)
                for name, payload in rows.items():
                    f = self._files[name]
                    sizes[name] = f.tell()
                    f.write(payload)
                    f.flush()
        except OSError as exc:
            self._undo(sizes)
            # Reopen (and repair) the folder before the next capture: the failed write may have
            # left half a row in a file buffer or on disk.
            self._close_files()
            with self._lock:
                self.skipped_error += 1
            if not self._failing:
                log.warning("capture of frame %d from camera %r failed, skipping captures until the disk "
                            "recovers: %s", item.frame_id, item.camera_id, exc)
            self._failing = True
            return
        if self._failing:
            log.info("captures are being written again to %s", self.directory)
            self._failing = False
        with self._lock:
            self.written += 1
            self.bytes_used += need

    def _undo(self, sizes: dict[str, int]) -> None:
        """Best effort after a failed capture: no half rows (the temporary image is already gone)."""
        for name, size in sizes.items():
            try:
                self._files[name].truncate(size)
            except (OSError, ValueError):
                pass

