"""Coil tracking in the server: every answered frame of a coil is in the database before its answer.

:class:`CoilTracker` owns the server's side of :mod:`coils.store`. The batcher calls
:meth:`CoilTracker.commit` with each finished batch BEFORE it sets the batch's answers: the
components of every frame that carries a coil (per class with pixels, in coil coordinates) are
written in one transaction per batch. A SIGKILLed server has therefore stored every frame it
answered; the camera library resends the others, and writes are idempotent on (coil, camera,
frame id), so a resend never doubles a record.

When the database cannot be written (down, slow, locked) the batch goes to the disk spool
(:class:`coils.spool.Spool`, bounded, fsynced) and its frames are answered as usual; later batches
go straight to the spool until the upkeep thread has drained it into the database again. Only when
the spool is full too are the frames failed with :class:`FrameNotRecorded`: their stream ends
UNAVAILABLE before their answers, and the camera resends them. Nothing is dropped.

The upkeep thread drains the spool and closes coils silent for ``silence_s``. Database work runs on
two threads of the tracker's own: the write path (commits, drains) and the read path (EndCoil,
GetCoil, ListCoils, the sweeper), so that a coil closing never holds up answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from coils import labelling, periodic
from coils.line import Line
from coils.records import Component, DefectRecord, FrameKey, frame_components
from coils.spool import Spool, SpoolFull
from coils.store import CoilStore, FrameComponents, StoreUnavailable
from coils.summary import CoilSummary
from server.batcher import FinishedBatch, FrameNotRecorded
from server.config import CoilTrackingConfig
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

#: Seconds between the upkeep thread's spool drains (while the spool holds frames).
DRAIN_INTERVAL_S = 0.5


class CoilTracker:
    """Stores answered frames' components per coil; ends, lists and reads coils back.

    Args:
        store: the coil database.
        spool: where batches wait while the database cannot be written.
        line: the line's geometry (cameras' lanes and pixel sizes).
        metrics: the server's series (``inspection_coil_*``).
        silence_s: an open coil with no frame for this long is closed by the sweeper.
    """

    def __init__(self, store: CoilStore, spool: Spool, line: Line, metrics: ServerMetrics,
                 silence_s: float) -> None:
        self.store = store
        self.spool = spool
        self.line = line
        self.silence_s = silence_s
        self._metrics = metrics
        self._owned = {c.camera_id: line.owned_across(c.camera_id) for c in line.cameras}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="coil-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="coil-read")
        self._stop = threading.Event()
        self._db_error = ""  # why the database cannot be written now; "" while it can
        self._open: set[str] = set()  # coils this server stored frames of and has not seen closed
        self.frames_stored = 0
        self.late_frames = 0
        self.refused_frames = 0
        self.coils_closed = 0
        #: Called with each batch's coil frames once stored or spooled (on the writer thread; keep it short).
        self.frame_listeners: list[Callable[[list[FrameComponents]], None]] = []
        #: Called with each coil's summary when it is closed (on the reader thread).
        self.close_listeners: list[Callable[[CoilSummary], None]] = []
        self._upkeep = threading.Thread(target=self._run_upkeep, name="coil-upkeep", daemon=True)
        self._update_spool_gauges()
        metrics.coil_db_up.set(1)

    @classmethod
    def open(cls, config: CoilTrackingConfig, line: Line, metrics: ServerMetrics) -> CoilTracker:
        """Opens (creating or upgrading) the database and the spool; starts the upkeep thread.

        Raises:
            coils.store.StoreUnavailable: the database cannot be reached.
        """
        labelling.warm_up()  # the first coil frame's answer must not wait for a compilation
        periodic.warm_up()  # nor the first coil's close
        store = CoilStore.open(config.db_url, line)
        try:
            spool = Spool(config.spool_dir, config.spool_max_bytes)
        except BaseException:
            store.close()
            raise
        tracker = cls(store, spool, line, metrics, config.silence_s)
        tracker._upkeep.start()
        log.info("event=coil_tracking db=%s spool=%s spool_pending=%d silence_s=%g", _redacted(config.db_url),
                 config.spool_dir, spool.pending_frames, config.silence_s)
        return tracker

    @property
    def writer(self) -> ThreadPoolExecutor:
        """The thread :meth:`commit` runs on (the batcher hands it each batch)."""
        return self._writer

    @property
    def reader(self) -> ThreadPoolExecutor:
        """The thread :meth:`end_coil`, :meth:`get_coil` and :meth:`list_coils` run on."""
        return self._reader

    @property
    def db_state(self) -> str:
        return "ok" if not self._db_error else self._db_error

    @property
    def open_coils(self) -> int:
        return len(self._open)

    # ------------------------------------------------------------------ the write path

    def commit(self, batch: FinishedBatch) -> list[Exception | None]:
        """Stores the batch's coil frames (runs on :attr:`writer`, before the batch is answered).

        Returns:
            Per frame of the batch: None (stored or spooled, or no coil), or the
            :class:`FrameNotRecorded` to answer it with (database down and spool full).
        """
        started = time.perf_counter()
        frames, positions = self.frame_components(batch)
        outcome: list[Exception | None] = [None] * len(batch.sources)
        if not frames:
            return outcome
        try:
            self._store_or_spool(frames)
            for listener in self.frame_listeners:
                listener(frames)
        except SpoolFull as exc:
            self.refused_frames += len(frames)
            self._metrics.coil_refused_frames.inc(len(frames))
            log.error("event=coil_frames_refused frames=%d: %s", len(frames), exc)
            failure = FrameNotRecorded(f"the frame was inspected but cannot be recorded: the coil database is "
                                       f"unavailable ({self.db_state}) and its spool is full ({exc}); resend it")
            for i in positions:
                outcome[i] = failure
        self._metrics.coil_commit_seconds.observe(time.perf_counter() - started)
        return outcome

    def frame_components(self, batch: FinishedBatch) -> tuple[list[FrameComponents], list[int]]:
        """The batch's frames that carry a coil, as stored, and their indices in the batch."""
        frames, positions = [], []
        now = time.time()
        masks, counts = batch.result.masks, batch.result.counts
        probs = batch.result.probs
        for i, request in enumerate(batch.sources):
            coil_id = getattr(request, "coil_id", "")
            if not coil_id:
                continue
            key = FrameKey(coil_id, request.camera_id, int(request.frame_id))
            camera = self.line.camera(request.camera_id)
            found: list[Component] = []
            for k in np.flatnonzero(counts[i] > 0):
                probability = None if probs is None else probs[i, k]
                found += frame_components(key, int(k) + 1, masks[i, k], float(request.position_mm), camera,
                                          self._owned[camera.camera_id], probability)
            frames.append(FrameComponents(key, float(request.position_mm), tuple(found), now))
            positions.append(i)
        return frames, positions

    def _store_or_spool(self, frames: list[FrameComponents]) -> None:
        """Writes ``frames`` in one transaction, or spools them; raises SpoolFull when neither can."""
        # While the database is known down and the spool holds frames, batches join the spool at once
        # (no wait for a connection to fail); the drainer finds out when the database is back.
        if not (self._db_error and self.spool.pending_frames):
            try:
                late = self.store.write_frames(frames)
            except StoreUnavailable as exc:
                self._database_failed(exc)
            else:
                self._stored(frames, late)
                self._database_back()
                return
        self.spool.append(frames)
        self._update_spool_gauges()

    def _stored(self, frames: Sequence[FrameComponents], late: Sequence[FrameKey]) -> None:
        self.frames_stored += len(frames)
        self._metrics.coil_frames_stored.inc(len(frames))
        self._open.update(f.key.coil_id for f in frames)
        self._late(late)

    def _late(self, late: Sequence[FrameKey]) -> None:
        """Reports frames the store kept as late (their coil was closed before they came)."""
        if late:
            self.late_frames += len(late)
            self._metrics.coil_late_frames.inc(len(late))
            for key in late:
                log.warning("event=coil_late_frame coil=%r camera=%r frame=%d: the coil was closed before this "
                            "frame arrived; it is kept, not merged into the coil's records", key.coil_id,
                            key.camera_id, key.frame_id)

    def _database_failed(self, exc: Exception) -> None:
        self._metrics.coil_db_errors.inc()
        if not self._db_error:
            log.error("event=coil_db_unavailable: %s; frames go to the spool until it returns", exc)
        self._db_error = f"unavailable: {exc}"
        self._metrics.coil_db_up.set(0)

    def drain(self) -> int:
        """Writes the spooled frames to the database (oldest first); returns how many (runs on :attr:`writer`).

        Raises:
            coils.store.StoreUnavailable: the database is still down (what is left stays spooled).
        """
        written = 0
        if self.spool.pending_frames:
            try:
                written = self.spool.drain(self.store, on_late=self._late)
            except StoreUnavailable as exc:
                self._database_failed(exc)
                raise
            finally:
                self._update_spool_gauges()
            self._database_back()
        if written:
            self.frames_stored += written
            self._metrics.coil_frames_stored.inc(written)
        return written

    def _database_back(self) -> None:
        if self._db_error:
            log.info("event=coil_db_available: frames are written directly again")
            self._db_error = ""
            self._metrics.coil_db_up.set(1)

    def _update_spool_gauges(self) -> None:
        self._metrics.coil_spool_frames.set(self.spool.pending_frames)
        self._metrics.coil_spool_bytes.set(self.spool.pending_bytes)

    # ------------------------------------------------------------------ upkeep: drain and sweep

    def _run_upkeep(self) -> None:
        sweep_every = max(DRAIN_INTERVAL_S, min(self.silence_s / 4, 10.0))
        next_sweep = time.monotonic() + sweep_every
        while not self._stop.wait(DRAIN_INTERVAL_S):
            try:
                if self.spool.pending_frames:
                    self._writer.submit(self._drain_quietly).result()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + sweep_every
                    self._reader.submit(self.sweep).result()
            except RuntimeError:  # the executors shut down under us: the server is stopping
                return
            except Exception:  # noqa: BLE001 - upkeep must outlive one failure; it is retried
                log.exception("event=coil_upkeep_error")

    def _drain_quietly(self) -> None:
        try:
            self.drain()
        except StoreUnavailable:
            pass  # counted and logged once by _database_failed; retried on the next round

    def sweep(self) -> list[str]:
        """Closes the coils whose last frame is older than ``silence_s`` (runs on :attr:`reader`)."""
        if self._db_error:
            return []
        try:
            silent = self.store.silent_coils(self.silence_s, time.time())
        except StoreUnavailable as exc:
            self._database_failed(exc)
            return []
        for coil_id in silent:
            try:
                self._close(coil_id, None, "silence")
            except (KeyError, StoreUnavailable) as exc:
                log.warning("event=coil_sweep_error coil=%r: %s", coil_id, exc)
        return silent

    # ------------------------------------------------------------------ the read path

    def end_coil(self, coil_id: str, length_mm: float | None) -> CoilSummary:
        """Drains this server's spool, then closes the coil (runs on :attr:`reader`).

        Raises:
            KeyError: no frame of the coil was stored.
            coils.store.StoreUnavailable: the database cannot be reached (retry).
        """
        self._writer.submit(self.drain).result()
        return self._close(coil_id, length_mm, "end")

    def _close(self, coil_id: str, length_mm: float | None, reason: str) -> CoilSummary:
        started, wall = time.perf_counter(), time.time()
        summary = self.store.close_coil(coil_id, length_mm, reason)
        if summary.closed_unix_s is not None and summary.closed_unix_s >= wall:  # closed now, not before
            self.coils_closed += 1
        self._open.discard(coil_id)
        for listener in self.close_listeners:
            listener(summary)
        elapsed = time.perf_counter() - started
        self._metrics.coil_close_seconds.observe(elapsed)
        log.info("event=coil_closed coil=%r reason=%s frames=%d records=%d close_s=%.3f", coil_id, summary.close_reason,
                 summary.frames, sum(summary.defects_per_class.values()), elapsed)
        return summary

    def get_coil(self, coil_id: str) -> tuple[CoilSummary, list[DefectRecord]]:
        return self.store.get_coil(coil_id)

    def list_coils(self, limit: int, after: float | tuple[float, str] | None) -> list[CoilSummary]:
        """Newest first; ``after``: opened before this time, or after this (opened, coil id) of a last page."""
        if isinstance(after, tuple):
            return self.store.list_coils(limit, *after)
        return self.store.list_coils(limit, after)

    def status(self) -> dict[str, Any]:
        """What ``GetLineStatus`` reports of coil tracking."""
        return {"enabled": True, "db_state": self.db_state, "spool_frames": self.spool.pending_frames,
                "spool_bytes": self.spool.pending_bytes, "open_coils": self.open_coils,
                "frames_stored": self.frames_stored, "late_frames": self.late_frames,
                "refused_frames": self.refused_frames, "coils_closed": self.coils_closed}

    def close(self) -> None:
        """Stops the upkeep thread (call after the last commit); the spool keeps what is left on disk."""
        self._stop.set()
        if self._upkeep.is_alive():
            self._upkeep.join(timeout=30)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        left = self.spool.pending_frames
        if left:
            log.warning("event=coil_spool_left frames=%d: they are written when a server opens this spool again", left)
        self.store.close()


def _redacted(url: str) -> str:
    """``url`` without its password, for the log."""
    head, at, tail = url.rpartition("@")
    if not at or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, credentials = head.partition("//")
    return f"{scheme}//{credentials.split(':', 1)[0]}:***@{tail}"


__all__ = ["CoilTracker", "DRAIN_INTERVAL_S"]
