"""Admission of frames into the server: the one owner of the in-flight slots and their accounting.

A frame holds a :class:`FrameLease` from the moment it is read off the wire until its answer is
written (or it is abandoned: the client cancelled, the deadline passed, the stream broke, the
handler was cancelled). :class:`Admission` owns the server-wide semaphore, the counters
(accepted, answered, abandoned, in flight) and the ``inspection_inflight_frames`` gauge; nobody
else touches them.

Releasing is synchronous (no ``await``) and idempotent: a handler releases every lease it holds
first thing in its ``finally``, before it awaits anything, so a cancellation that lands while it
cleans up cannot skip the release; releasing twice counts once.
"""

from __future__ import annotations

import asyncio

import grpc

from protos.inspection.v1 import inspection_pb2 as pb
from server.metrics import ServerMetrics

_STATUS_BY_CODE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


class FrameLease:
    """One frame's in-flight slot (server-wide, and its stream's when it came on a stream).

    End it with :meth:`answered` or :meth:`abandon`; the first call releases, later ones do nothing.
    """

    __slots__ = ("_admission", "_stream_slots", "_owner", "released")

    def __init__(self, admission: Admission, stream_slots: asyncio.Semaphore | None,
                 owner: set[FrameLease] | None) -> None:
        self._admission = admission
        self._stream_slots = stream_slots
        self._owner = owner
        self.released = False
        if owner is not None:
            owner.add(self)

    def answered(self, response: pb.InspectResponse) -> None:
        """The frame's response was written: counted by its outcome, slot released."""
        if self._release():
            self._admission._answered(response)

    def abandon(self) -> None:
        """The frame will never be answered: counted as abandoned ("cancelled"), slot released."""
        if self._release():
            self._admission._abandoned()

    def _release(self) -> bool:
        if self.released:
            return False
        self.released = True
        if self._owner is not None:
            self._owner.discard(self)
        if self._stream_slots is not None:
            self._stream_slots.release()
        self._admission._slots.release()
        return True


class Admission:
    """The server's in-flight frames: at most ``max_inflight`` read and not yet answered.

    Args:
        max_inflight: the bound, over all calls.
        metrics: where the in-flight gauge and the frames-by-outcome counter live.
    """

    def __init__(self, max_inflight: int, metrics: ServerMetrics) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self._slots = asyncio.Semaphore(max_inflight)
        self._metrics = metrics
        self.inflight = 0
        self.accepted = 0
        self.answered = 0
        self.abandoned = 0

    @property
    def saturated(self) -> bool:
        return self._slots.locked()

    async def acquire(self, stream_slots: asyncio.Semaphore | None = None,
                      owner: set[FrameLease] | None = None) -> FrameLease:
        """Waits for a slot (first the stream's, then the server's); a cancelled wait holds nothing.

        Args:
            stream_slots: the stream's own bound, released with the lease.
            owner: a set the lease sits in until released (what a handler releases on its way out).
        """
        if stream_slots is not None:
            await stream_slots.acquire()
        try:
            await self._slots.acquire()
        except BaseException:
            if stream_slots is not None:
                stream_slots.release()
            raise
        return self._accepted(stream_slots, owner)

    async def try_acquire(self) -> FrameLease | None:
        """A slot now, or None when the server is saturated (InspectOne answers RESOURCE_EXHAUSTED)."""
        if self._slots.locked():
            return None
        # Not locked: asyncio.Semaphore.acquire takes the slot without suspending, nothing interleaves.
        await self._slots.acquire()
        return self._accepted(None, None)

    def _accepted(self, stream_slots: asyncio.Semaphore | None, owner: set[FrameLease] | None) -> FrameLease:
        self.accepted += 1
        self.inflight += 1
        self._metrics.inflight.set(self.inflight)
        return FrameLease(self, stream_slots, owner)

    def _answered(self, response: pb.InspectResponse) -> None:
        self.answered += 1
        self.inflight -= 1
        self._metrics.inflight.set(self.inflight)
        status = grpc.StatusCode.OK if not response.HasField("error") else _STATUS_BY_CODE[response.error.code]
        self._metrics.frames.labels(status=status.name.lower()).inc()

    def _abandoned(self) -> None:
        self.abandoned += 1
        self.inflight -= 1
        self._metrics.inflight.set(self.inflight)
        self._metrics.frames.labels(status="cancelled").inc()


def release_all(leases: set[FrameLease]) -> int:
    """Abandons every lease still in ``leases`` (a handler on its way out); returns how many."""
    held = list(leases)
    for lease in held:
        lease.abandon()
    return len(held)
