"""server/admission.py: in-flight slots are released whatever their holder dies of, cancellation
during its cleanup included, and releasing twice counts once (real asyncio tasks and semaphores)."""

from __future__ import annotations

import asyncio

import pytest

from protos.inspection.v1 import inspection_pb2 as pb
from server.admission import Admission, release_all
from server.metrics import ServerMetrics


def gauge(metrics: ServerMetrics) -> float:
    return metrics.registry.get_sample_value("inspection_inflight_frames")


def test_cancellation_during_cleanup_releases_every_slot():
    # The shape of the Inspect handler: leases taken, then the handler is cancelled, and cancelled
    # again while its cleanup awaits the abandoned frames (what gRPC did after a failed write).
    metrics = ServerMetrics()

    async def main():
        admission = Admission(8, metrics)
        stream_slots = asyncio.Semaphore(4)
        leases: set = set()
        in_cleanup = asyncio.Event()

        async def handler():
            for _ in range(4):
                await admission.acquire(stream_slots, owner=leases)
            try:
                await asyncio.sleep(3600)  # waiting for an answer
            finally:
                release_all(leases)  # before any await
                in_cleanup.set()
                await asyncio.sleep(3600)  # awaiting the abandoned frames

        task = asyncio.create_task(handler())
        await asyncio.sleep(0.01)
        assert admission.inflight == 4 and stream_slots.locked()
        task.cancel()
        await in_cleanup.wait()
        task.cancel()  # the second cancellation lands inside the cleanup's await
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not stream_slots.locked()
        # All 8 server-wide slots are free again: 8 more acquire without waiting.
        more = [await asyncio.wait_for(admission.acquire(), timeout=1) for _ in range(8)]
        assert admission.saturated and await admission.try_acquire() is None
        for lease in more:
            lease.abandon()
        return admission

    admission = asyncio.run(main())
    assert (admission.inflight, admission.accepted, admission.abandoned) == (0, 12, 12)
    assert gauge(metrics) == 0


def test_release_is_idempotent_and_counts_the_outcome_once():
    metrics = ServerMetrics()

    async def main():
        admission = Admission(2, metrics)
        lease = await admission.try_acquire()
        answer = pb.InspectResponse(camera_id="cam", frame_id=1)
        lease.answered(answer)
        lease.answered(answer)
        lease.abandon()  # the handler's finally, after the answer: a no-op
        return admission

    admission = asyncio.run(main())
    assert (admission.inflight, admission.answered, admission.abandoned) == (0, 1, 0)
    assert metrics.registry.get_sample_value("inspection_frames_total", {"status": "ok"}) == 1
    assert metrics.registry.get_sample_value("inspection_frames_total", {"status": "cancelled"}) is None


def test_a_cancelled_wait_holds_no_slot():
    metrics = ServerMetrics()

    async def main():
        admission = Admission(1, metrics)
        stream_slots = asyncio.Semaphore(2)
        held = await admission.acquire(stream_slots)
        waiting = asyncio.create_task(admission.acquire(stream_slots))
        await asyncio.sleep(0.01)  # holds a stream slot, waits for the server's
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        held.abandon()
        assert not stream_slots.locked() and stream_slots._value == 2  # noqa: SLF001 - both stream slots back
        return admission

    admission = asyncio.run(main())
    assert admission.inflight == 0 and admission.accepted == 1
