"""The camera side: one camera's frames to an inspection server, never losing one.

A line camera's software opens a :class:`CameraStream` on a channel (a server, or a balancer in
front of replicas), sends its frames with increasing frame ids, and reads exactly one
:class:`Answer` per frame, in frame order::

    async with open_channel("balancer:50051") as channel:
        async with CameraStream(channel, "line1-top") as camera:
            await camera.send(request)           # an InspectRequest; waits while the buffer is full
            ...
            await camera.close()                 # no more frames: answers() ends after the last one
            async for answer in camera.answers():
                ...                              # answer.frame_id, answer.response / answer.error

What happens underneath: one ``Inspect`` stream stays open. When it ends with UNAVAILABLE, a
connection error or a reset (a server draining on SIGTERM, dying, restarting; a balancer taking a
replica out), the stream reconnects with exponential backoff and full jitter and resends, with
the same camera and frame ids, every frame sent and not yet answered. A frame may therefore reach
servers more than once (at-least-once on the wire); an answer for a frame already answered is
dropped and counted, so the caller sees each frame exactly once. A frame the server answers with
an error (a bad frame) is an answer, not a reason to resend.

Resend or stop is the server's call: the inspection server sets a trailer
(:data:`server.config.RESEND_KEY`) on every status that ends a stream, and the camera follows it
whatever the status code says (grpc.aio may report a status that arrives while it is writing as
INTERNAL, grpc/grpc#36066). Where no trailer came (a balancer, a reset, a rewritten status) the code
decides (:data:`RETRYABLE`), and the next stream starts in lock-step: one frame, then nothing more
until its answer, so that a status the server sends then reaches the camera as sent. A final status
ends the stream with a :class:`CameraStreamError` naming it and the unanswered frames.

``Backoff.give_up_s`` bounds how long frames wait without a single answer, whether the server is
unreachable or connected and silent: then the stream fails with a :class:`CameraStreamError`
listing the unanswered frames, and leaving ``async with`` returns.

The resend buffer holds the frames sent and not yet answered, at most ``max_unanswered``. When it
is full, ``policy="block"`` (the default) makes :meth:`CameraStream.send` wait: the camera slows to
the server's pace and nothing is lost. ``policy="drop_oldest"`` gives the oldest unanswered frame a
local answer ("dropped"), counts it and logs it, so a camera that cannot wait keeps its newest
frames. A frame larger than the server's message limit is never sent (the server would end the
whole stream on it): it is answered locally with an error, and nothing else is affected.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from client.wire import MAX_CAMERA_ID_BYTES, MAX_MESSAGE_BYTES, RESEND_FINAL, RESEND_KEY, RESEND_YES
from protos.inspection.v1 import inspection_pb2 as pb
from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

POLICIES = ("block", "drop_oldest")

# Statuses a new stream (to the same server later, or to another replica) can mend, for endings
# that carry no RESEND_KEY trailer. INTERNAL and UNKNOWN come from resets: a balancer whose replica
# died resets the stream, and grpc's asyncio client reports a status that arrives while it is still
# writing as INTERNAL (grpc/grpc#36066).
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED,
})


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message limits, and a quick reconnect: a restarted server is found within a second or two
    (gRPC's own default backs off up to two minutes, which is longer than any drain)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
    ]


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int | None = None) -> grpc.aio.Channel:
    """A channel to ``target`` (``HOST:PORT``) for cameras: TLS with ``credentials``, else plaintext."""
    options = channel_options(max_message_bytes or MAX_MESSAGE_BYTES)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


@dataclass
class Backoff:
    """Exponential backoff with full jitter: the n-th retry in a row waits uniform(0, min(cap, base * 2**n)).

    Attributes:
        base_s, cap_s: the first ceiling and the largest.
        give_up_s: seconds frames wait without a single answer before the stream fails (None: never),
            whether the server is unreachable or connected and silent.
    """

    base_s: float = 0.05
    cap_s: float = 2.0
    give_up_s: float | None = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2 ** min(attempt, 30)))


@dataclass
class Answer:
    """The one answer for one frame: the server's ``response`` (which may carry a frame ``error``),
    or, when the frame never reached a server, ``response`` None and a local ``error`` saying why."""

    frame_id: int
    response: pb.InspectResponse | None
    error: str = ""
    latency_s: float = 0.0  # from send() to the answer, resends included

    @property
    def ok(self) -> bool:
        return self.response is not None and not self.response.HasField("error")

    @property
    def error_message(self) -> str:
        """Why the frame failed ("" when it did not): the server's frame error or the local one."""
        if self.response is not None:
            return self.response.error.message if self.response.HasField("error") else ""
        return self.error


@dataclass
class CameraCounters:
    """What one camera stream did; ``resent`` and ``duplicates`` are the price of reconnecting."""

    sent: int = 0         # frames written to a stream, resends included
    answered: int = 0     # answers handed to the caller (local ones included)
    resent: int = 0       # writes of a frame already written to an earlier stream
    duplicates: int = 0   # answers dropped: their frame was already answered (or dropped)
    reconnects: int = 0   # streams opened after the first
    dropped: int = 0      # frames given a local "dropped" answer (policy drop_oldest)
    refused: int = 0      # frames never sent: larger than the message limit


class CameraStreamError(RuntimeError):
    """The stream ended for good: a status resending cannot mend, or no answer for ``give_up_s``."""

    def __init__(self, message: str, code: grpc.StatusCode | None, unanswered: list[int]):
        super().__init__(message)
        self.code = code
        self.unanswered = unanswered


@dataclass
class _Frame:
    request: pb.InspectRequest
    queued_at: float
    writes: int = 0
    local_error: str = ""  # set: answered locally, never sent


@dataclass
class _State:
    frames: OrderedDict[int, _Frame] = field(default_factory=OrderedDict)
    last_frame_id: int = -1
    closed: bool = False


@dataclass(frozen=True)
class _StreamEnd:
    """How one ``Inspect`` call ended: its status (None: ended cleanly), and whether to resend."""

    code: grpc.StatusCode | None
    details: str
    resend: bool
    server_said: bool  # the resend decision came from the server's trailer


def _stream_end(error: grpc.aio.AioRpcError) -> _StreamEnd:
    """The server's resend decision from the trailer; the status code's where it sent none."""
    told = dict(error.trailing_metadata() or ()).get(RESEND_KEY)
    if told in (RESEND_YES, RESEND_FINAL):
        return _StreamEnd(error.code(), error.details() or "", told == RESEND_YES, True)
    return _StreamEnd(error.code(), error.details() or "", error.code() in RETRYABLE, False)


class CameraStream:
    """One camera's frames to the server behind ``channel``, one :class:`Answer` per frame, in order.

    Args:
        channel: a ``grpc.aio`` channel (:func:`open_channel`); several cameras may share one.
        camera_id: written into every request.
        max_unanswered: the resend buffer: frames sent and not yet answered.
        policy: ``"block"`` (send waits while the buffer is full) or ``"drop_oldest"``.
        backoff: reconnect delays, and when to give up.
        max_message_bytes: frames whose request is larger are answered locally, never sent
            (default: the server's, ``server.config.MAX_MESSAGE_BYTES``).
        seed: for the jitter (tests).
    """

    def __init__(self, channel: grpc.aio.Channel, camera_id: str, *, max_unanswered: int = 64,
                 policy: str = "block", backoff: Backoff | None = None, max_message_bytes: int | None = None,
                 seed: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if not camera_id or len(camera_id.encode()) > MAX_CAMERA_ID_BYTES:
            raise ValueError(f"camera_id must be 1..{MAX_CAMERA_ID_BYTES} bytes of UTF-8, got "
                             f"{len(camera_id.encode())} bytes")
        if max_unanswered < 1:
            raise ValueError(f"max_unanswered must be >= 1, got {max_unanswered}")
        self.camera_id = camera_id
        self.counters = CameraCounters()
        self._stub = pb_grpc.InspectionServiceStub(channel)
        self._max_unanswered = max_unanswered
        self._policy = policy
        self._backoff = backoff or Backoff()
        self._limit = max_message_bytes or MAX_MESSAGE_BYTES
        self._rng = random.Random(seed)
        self._state = _State()
        self._answers: asyncio.Queue[Answer | None] = asyncio.Queue()
        self._changed = asyncio.Event()  # a frame was added, answered or the stream closed
        self._failure: CameraStreamError | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress_at = time.monotonic()  # the last answer, or the first frame after none were unanswered
        self._last_end: _StreamEnd | None = None
        self._lockstep = False  # the next stream waits for its first answer before its second frame

    async def __aenter__(self) -> CameraStream:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"camera-{self.camera_id}")
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        # Closed and leaving normally: the frames still unanswered are worth waiting for.
        if self._task is not None and not self._task.done() and not (exc_type is None and self._state.closed):
            self._task.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # ------------------------------------------------------------------ the caller's side

    async def send(self, request: pb.InspectRequest) -> None:
        """Queues one frame (its ``camera_id`` is set to this camera's); frame ids must increase. Every
        other field (the image, ``coil_id``, ``position_mm``...) is sent as given, and resent unchanged.

        Raises:
            ValueError: a frame id not above the previous one.
            CameraStreamError: the stream has ended for good.
        """
        state = self._state
        if self._failure is not None:
            raise self._failure
        if state.closed:
            raise RuntimeError(f"camera {self.camera_id}: send() after close()")
        if request.frame_id <= state.last_frame_id:
            raise ValueError(f"camera {self.camera_id}: frame ids must increase; frame {request.frame_id} "
                             f"after frame {state.last_frame_id}")
        request.camera_id = self.camera_id
        state.last_frame_id = request.frame_id
        frame = _Frame(request, time.perf_counter())
        size = request.ByteSize()
        if size > self._limit:
            self.counters.refused += 1
            frame.local_error = (f"frame {request.frame_id} not sent: its request is {size} bytes, over the "
                                 f"{self._limit}-byte message limit (the server would end the stream on it)")
            log.warning("camera=%s %s", self.camera_id, frame.local_error)
        else:
            await self._make_room()
            frame.queued_at = time.perf_counter()
            if not self._in_flight():
                self._progress_at = time.monotonic()  # the wait for an answer starts now
        state.frames[request.frame_id] = frame
        self._deliver_local()
        self._changed.set()

    async def close(self) -> None:
        """No more frames: the stream ends once every frame sent is answered."""
        self._state.closed = True
        self._changed.set()

    async def answers(self) -> AsyncIterator[Answer]:
        """Every frame's answer, in frame order; ends after close() once all are answered.

        Raises:
            CameraStreamError: the stream ended for good (after the answers that did arrive).
        """
        while (answer := await self._answers.get()) is not None:
            yield answer
        if self._failure is not None:
            raise self._failure

    @property
    def unanswered(self) -> int:
        return len(self._state.frames)

    # ------------------------------------------------------------------ the buffer

    def _in_flight(self) -> int:
        return sum(1 for f in self._state.frames.values() if not f.local_error)

    async def _make_room(self) -> None:
        while self._in_flight() >= self._max_unanswered:
            if self._policy == "drop_oldest":
                oldest = next(fid for fid, f in self._state.frames.items() if not f.local_error)
                self._state.frames[oldest].local_error = "dropped: the camera's resend buffer was full"
                self.counters.dropped += 1
                log.warning("camera=%s event=frame_dropped frame=%d unanswered=%d (buffer full, policy "
                            "drop_oldest)", self.camera_id, oldest, self._in_flight() + 1)
                self._deliver_local()
                continue
            self._changed.clear()
            await self._changed.wait()
            if self._failure is not None:
                raise self._failure

    def _hand_over(self, frame_id: int, frame: _Frame, response: pb.InspectResponse | None) -> None:
        self._answers.put_nowait(Answer(frame_id, response, frame.local_error,
                                        time.perf_counter() - frame.queued_at))
        self.counters.answered += 1

    def _deliver_local(self) -> None:
        """Frames at the head answered locally (refused, dropped) leave in their turn."""
        frames = self._state.frames
        while frames and next(iter(frames.values())).local_error:
            frame_id, frame = frames.popitem(last=False)
            self._hand_over(frame_id, frame, None)

    def _on_response(self, response: pb.InspectResponse) -> bool:
        """Hands over the answer of the oldest unanswered frame; False for a duplicate."""
        frames = self._state.frames
        frame = frames.get(response.frame_id)
        if response.camera_id != self.camera_id or frame is None or frame.local_error:
            self.counters.duplicates += 1
            return False
        head = next(fid for fid, f in frames.items() if not f.local_error)
        if response.frame_id != head:
            raise CameraStreamError(
                f"camera {self.camera_id}: the server answered frame {response.frame_id} before frame {head} "
                "(answers must come in frame order)", None, list(frames))
        del frames[head]
        self._progress_at = time.monotonic()
        self._hand_over(head, frame, response)
        self._deliver_local()
        self._changed.set()
        return True

    # ------------------------------------------------------------------ the connection

    async def _requests(self) -> AsyncIterator[pb.InspectRequest]:
        """One stream's frames: every unanswered one in order (resends first), then new ones."""
        last_written = -1
        answered_at_start = self.counters.answered
        while True:
            if self._lockstep and last_written >= 0:
                if self.counters.answered == answered_at_start:
                    self._changed.clear()
                    await self._changed.wait()  # the server's first answer, or its status, comes first
                    continue
                self._lockstep = False
            frame_id, frame = next(((fid, f) for fid, f in self._state.frames.items()
                                    if fid > last_written and not f.local_error), (None, None))
            if frame is None:
                if self._state.closed:
                    return  # half-close: the server answers what it has, then ends the stream
                self._changed.clear()
                await self._changed.wait()
                continue
            self.counters.sent += 1
            self.counters.resent += frame.writes > 0
            frame.writes += 1
            last_written = frame_id
            yield frame.request

    def _done(self) -> bool:
        return self._state.closed and not self._state.frames

    async def _run(self) -> None:
        give_up = self._backoff.give_up_s
        loop = asyncio.get_running_loop()
        watchdog = loop.create_task(self._watch_progress(give_up)) if give_up is not None else None
        try:
            await self._stream_until_done()
        except CameraStreamError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(CameraStreamError(f"camera {self.camera_id}: stream closed", grpc.StatusCode.CANCELLED,
                                         list(self._state.frames)))
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self._answers.put_nowait(None)

    async def _stream_until_done(self) -> None:
        """Streams, and reconnects after each ending the server (or the code) says resending can mend."""
        attempt = 0
        while not self._done():
            if not self._in_flight():
                self._changed.clear()
                await self._changed.wait()  # open a stream only once there is a frame for it
                continue
            answered_before = self.counters.answered
            end = self._last_end = await self._stream_once()
            if self.counters.answered > answered_before:
                attempt = 0
            if self._done():
                break
            if not end.resend:
                raise CameraStreamError(
                    f"camera {self.camera_id}: the server ended the stream with {_name(end.code)}: {end.details}; "
                    "resending cannot mend that", end.code, list(self._state.frames))
            self._lockstep = end.code is not None and not end.server_said
            delay = self._backoff.delay(attempt, self._rng)
            attempt += 1
            log.info("camera=%s event=reconnect status=%s unanswered=%d delay_s=%.3f: %s", self.camera_id,
                     _name(end.code), self.unanswered, delay, end.details)
            await asyncio.sleep(delay)
            self.counters.reconnects += 1

    async def _watch_progress(self, give_up_s: float) -> None:
        """Fails the stream once frames have waited ``give_up_s`` without a single answer."""
        while True:
            waited = time.monotonic() - self._progress_at
            if self._in_flight() and waited >= give_up_s:
                end = self._last_end
                last = ("the server took the stream and has not answered" if end is None
                        else f"last: {_name(end.code)}: {end.details}")
                self._fail(CameraStreamError(f"camera {self.camera_id}: no answer for {give_up_s:g} s ({last})",
                                             None if end is None else end.code, list(self._state.frames)))
                if self._task is not None:
                    self._task.cancel()
                return
            await asyncio.sleep(min(1.0, give_up_s / 10))

    def _fail(self, exc: CameraStreamError) -> None:
        if self._failure is None:
            self._failure = exc
            log.error("camera=%s event=stream_failed unanswered=%d: %s", self.camera_id, len(exc.unanswered), exc)
        self._changed.set()

    async def _stream_once(self) -> _StreamEnd:
        """One ``Inspect`` call: how it ended."""
        call = self._stub.Inspect(self._requests())
        try:
            async for response in call:
                self._on_response(response)
            return _StreamEnd(None, "stream ended", True, False)
        except grpc.aio.AioRpcError as exc:
            return _stream_end(exc)
        except grpc.aio.UsageError as exc:  # the channel was closed under us
            raise CameraStreamError(f"camera {self.camera_id}: {exc}", None, list(self._state.frames)) from exc
        finally:
            call.cancel()


def _name(code: grpc.StatusCode | None) -> str:
    return code.name if code is not None else "OK"


__all__ = ["Answer", "Backoff", "CameraCounters", "CameraStream", "CameraStreamError",
           "open_channel", "POLICIES", "RETRYABLE"]
