"""The gRPC methods of :class:`server.service.InspectionServer`: one ``Inspect`` call's reader and
ordered writer (:class:`CameraCall`), and the servicer that runs them.

An ``Inspect`` call's reader takes a request off the wire only while the stream and the server have
room (that is the backpressure; HTTP/2 flow control does the rest), hands it to a frame task and
queues that task in the call's answer queue. The writer awaits the tasks in queue order, so
responses leave in frame order whatever order the batches finished in, and every frame that was
read gets exactly one response, an error included; or, when a frame's result could not be made
durable (coil tracking's database down and its spool full), the call ends UNAVAILABLE before that
frame's answer, saying "resend", and the camera resends it and the frames after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc

from protos.inspection.v1 import inspection_pb2 as pb
from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from server.admission import Admission, FrameLease, release_all
from server.config import ServerConfig, clip
from server.wire import UnreadableRequest, end_stream

if TYPE_CHECKING:
    from server.coil_tracker import CoilTracker

log = logging.getLogger(__name__)

T = TypeVar("T")

Request = pb.InspectRequest | UnreadableRequest
#: A frame answer with this code is never sent: its result could not be made durable (coil tracking's
#: database down and spool full), so the call ends UNAVAILABLE and the camera resends the frame.
NOT_RECORDED = grpc.StatusCode.UNAVAILABLE.value[0]


class InspectionServer(Protocol):
    """What the calls use of :class:`server.service.InspectionServer` (which imports this module)."""

    config: ServerConfig
    admission: Admission
    info: pb.ModelInfo | None
    line_info: pb.Line | None
    coils: CoilTracker | None

    @property
    def inflight(self) -> int: ...
    async def admit_call(self, context: grpc.aio.ServicerContext, draining_ok: bool = False) -> None: ...
    def deadline_of(self, context: grpc.aio.ServicerContext) -> float | None: ...
    def call_started(self, stream: CameraCall | None) -> None: ...
    def call_ended(self, stream: CameraCall | None) -> None: ...
    def spawn_frame(self, request: Request, deadline: float | None,
                    received: float) -> asyncio.Task[pb.InspectResponse]: ...
    async def inspect_frame(self, request: Request, deadline: float | None, received: float) -> pb.InspectResponse: ...
    def line_status(self, camera_id: str = "") -> pb.LineStatus: ...


class CameraCall:
    """One Inspect call: a reader task feeding frame tasks into an ordered answer queue.

    Every frame read holds a lease from the server's :class:`Admission` (in ``leases`` until it is
    answered or abandoned); ``slots`` bounds this stream's share.
    """

    def __init__(self, server: InspectionServer, requests: AsyncIterator[Request],
                 deadline: float | None):
        self.server = server
        self.requests = requests
        self.deadline = deadline
        self.slots = asyncio.Semaphore(server.config.max_stream_inflight)
        self.answers: asyncio.Queue[tuple[asyncio.Task[pb.InspectResponse], FrameLease] | None] = asyncio.Queue()
        self.leases: set[FrameLease] = set()
        self.read = 0
        self.answered = 0
        self.last_frame: tuple[str, int] | None = None
        self.stopped_reading = False
        self.unreadable: UnreadableRequest | None = None  # a message that was no InspectRequest: the call ends
        self.unrecorded: pb.InspectResponse | None = None  # a frame whose result could not be made durable
        self.reader: asyncio.Task[None] | None = None
        self.current: asyncio.Task[pb.InspectResponse] | None = None  # the answer being written

    def stop_reading(self) -> None:
        """Shutdown: take no more frames; the ones already read are still answered."""
        self.stopped_reading = True
        if self.reader is not None:
            self.reader.cancel()

    async def read_frames(self) -> None:
        server = self.server
        try:
            if self.stopped_reading:  # shutdown began before the first read
                return
            async for request in self.requests:
                received = time.perf_counter()
                if isinstance(request, UnreadableRequest) and request.frame_id is None:
                    self.unreadable = request  # no frame to answer: the stream ends after those read
                    return
                # Not reading while full is the backpressure: gRPC stops granting the camera
                # HTTP/2 flow-control window, so its writes wait instead of piling up here.
                lease = await server.admission.acquire(self.slots, owner=self.leases)
                self.read += 1
                self.last_frame = (request.camera_id, request.frame_id)
                self.answers.put_nowait((server.spawn_frame(request, self.deadline, received), lease))
        except asyncio.CancelledError:
            if not self.stopped_reading:
                raise
        finally:
            self.answers.put_nowait(None)

    def abandon(self) -> list[asyncio.Task]:
        """Ends the reader and every unanswered frame; releases their leases now (no await).

        Returns:
            The tasks to await (the reader and the cancelled frames) for their exceptions.
        """
        tasks: list[asyncio.Task] = []
        if self.reader is not None:
            if not self.reader.done():
                self.reader.cancel()
            tasks.append(self.reader)
        if self.current is not None and not self.current.done():
            tasks.append(self.current)
        while not self.answers.empty():
            item = self.answers.get_nowait()
            if item is not None:
                tasks.append(item[0])
        for task in tasks:
            task.cancel()
        release_all(self.leases)
        return tasks

    def drained_message(self) -> str:
        last = self.last_frame
        after = f"; the last frame read was {clip(last[0])!r}/{last[1]}" if last else ""
        return (f"server is shutting down: answered all {self.answered} frames it read{after}; "
                "resend later frames to another server")

    async def write_answers(self, context: grpc.aio.ServicerContext) -> None:
        """Writes each frame's answer in read order, until the reader has ended or a frame's result
        could not be recorded (:attr:`unrecorded`: the stream must end so that the camera resends it)."""
        while (item := await self.answers.get()) is not None:
            self.current, lease = item
            response = await self.current
            if response.error.code == NOT_RECORDED:
                self.unrecorded = response
                break
            await context.write(response)
            self.answered += 1
            lease.answered(response)
        self.current = None


class Servicer(pb_grpc.InspectionServiceServicer):
    """``inspection.v1.InspectionService`` of one :class:`InspectionServer`."""

    def __init__(self, server: InspectionServer) -> None:
        self.server = server

    async def Inspect(self, request_iterator: AsyncIterator[Request],
                      context: grpc.aio.ServicerContext) -> None:
        # A coroutine writing with context.write (not an async generator): when the client cancels,
        # the cancellation lands inside this coroutine and the cleanup below runs at once.
        server = self.server
        await server.admit_call(context)
        call = CameraCall(server, request_iterator, server.deadline_of(context))
        server.call_started(call)
        try:
            call.reader = asyncio.get_running_loop().create_task(call.read_frames())
            await call.write_answers(context)
            if call.unrecorded is not None:
                # Not answered: the camera resends this frame and every later one (the finally below
                # abandons them), as after a drain; coil tracking's spool was full.
                await end_stream(context, grpc.StatusCode.UNAVAILABLE, call.unrecorded.error.message, resend=True)
            await call.reader  # re-raises a failed read (a broken stream)
            await self._end(call, context)
        finally:
            # Client cancel, deadline, broken stream, a failed write, or this task cancelled: every
            # slot is released before the first await below, so a cancellation landing there
            # cannot leak one, and the call is counted as ended whatever happens to that await.
            abandoned = call.abandon()
            try:
                await asyncio.gather(*abandoned, return_exceptions=True)
            finally:
                server.call_ended(call)

    @staticmethod
    async def _end(call: CameraCall, context: grpc.aio.ServicerContext) -> None:
        """Ends a call whose frames are all answered: drained, unreadable, or the camera half-closed."""
        if call.unreadable is not None:
            log.warning("event=stream_unreadable peer=%s frames_read=%d: %s", context.peer(), call.read,
                        call.unreadable.problem)
            await end_stream(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"message {call.read + 1} of the stream: {call.unreadable.problem}; every frame "
                             f"before it is answered ({call.read})", resend=False)
        if call.stopped_reading:
            log.info("event=stream_drained peer=%s frames_read=%d answered=%d", context.peer(), call.read,
                     call.answered)
            await end_stream(context, grpc.StatusCode.UNAVAILABLE, call.drained_message(), resend=True)

    async def InspectOne(self, request: Request,
                         context: grpc.aio.ServicerContext) -> pb.InspectResponse:
        server = self.server
        received = time.perf_counter()
        await server.admit_call(context)
        if isinstance(request, UnreadableRequest) and request.frame_id is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
        lease = await server.admission.try_acquire()
        if lease is None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server saturated: {server.inflight} frames in flight (max {server.config.max_inflight}); "
                "retry later",
            )
        server.call_started(None)
        try:
            response = await server.inspect_frame(request, server.deadline_of(context), received)
            if response.error.code == NOT_RECORDED:
                await context.abort(grpc.StatusCode.UNAVAILABLE, response.error.message)
            lease.answered(response)
            return response
        finally:
            lease.abandon()  # a no-op once answered
            server.call_ended(None)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        await self.server.admit_call(context, draining_ok=True)
        assert self.server.info is not None
        return self.server.info

    async def GetLineStatus(self, request: pb.GetLineStatusRequest, context: grpc.aio.ServicerContext) -> pb.LineStatus:
        await self.server.admit_call(context, draining_ok=True)
        return self.server.line_status(request.camera_id)

    async def GetLine(self, request: pb.GetLineRequest, context: grpc.aio.ServicerContext) -> pb.Line:
        # The line is known from the start (it does not wait for the model), and while draining.
        if self.server.line_info is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this server was started without a line description (server serve --line "
                                "line.yaml): it knows no line geometry")
        return self.server.line_info

    # ------------------------------------------------------------------ coils

    async def EndCoil(self, request: pb.EndCoilRequest, context: grpc.aio.ServicerContext) -> pb.CoilSummary:
        from server.coil_wire import end_coil_problem, summary_message

        await self._require_coils(context)
        if (problem := end_coil_problem(request)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        length = request.length_mm if request.HasField("length_mm") else None
        summary = await self._on_coils(context, request.coil_id, lambda coils: coils.end_coil(request.coil_id, length))
        return summary_message(summary)

    async def ListCoils(self, request: pb.ListCoilsRequest, context: grpc.aio.ServicerContext) -> pb.ListCoilsResponse:
        from server.coil_wire import page_request, page_token, summary_message

        await self._require_coils(context)
        try:
            size, after = page_request(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        coils = await self._on_coils(context, "", lambda tracker: tracker.list_coils(size, after))
        return pb.ListCoilsResponse(coils=[summary_message(c) for c in coils], next_page_token=page_token(coils, size))

    async def GetCoil(self, request: pb.GetCoilRequest, context: grpc.aio.ServicerContext) -> pb.Coil:
        from server.coil_wire import coil_message

        await self._require_coils(context)
        if not request.coil_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "coil_id is empty: name the coil to read")

        def read(coils: CoilTracker) -> pb.Coil:
            summary, records = coils.get_coil(request.coil_id)
            return coil_message(summary, records, coils.store.verdict(summary, records))

        return await self._on_coils(context, request.coil_id, read)

    async def _require_coils(self, context: grpc.aio.ServicerContext) -> CoilTracker:
        """The server's coil tracker; FAILED_PRECONDITION (before any other check) without --coil-db."""
        if self.server.coils is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this server does not track coils: start it with --coil-db URL (and --line)")
        return self.server.coils

    async def _on_coils(self, context: grpc.aio.ServicerContext, coil_id: str,
                        work: Callable[[CoilTracker], T]) -> T:
        """``work(tracker)`` on the tracker's read thread, its errors as statuses: NOT_FOUND for an
        unknown coil, UNAVAILABLE while the database is down."""
        from coils.store import StoreUnavailable

        coils = await self._require_coils(context)

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(coils.reader, work, coils)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no coil {clip(coil_id)!r}: no frame of it was stored")
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the coil database cannot be reached ({exc}); retry")
        raise AssertionError("unreachable")  # context.abort raises


__all__ = ["CameraCall", "Servicer"]
