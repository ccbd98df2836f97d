"""The inspection service: ``InspectionServer(backend, config)``, usable as a library and by ``server serve``.

Life of a frame: the stream's reader takes a request off the wire (only while the stream and the
server have room: that is the backpressure, HTTP/2 flow control does the rest), hands it to a
frame task (decode in the worker pool -> dynamic batcher -> inference thread -> RLE in the worker
pool) and queues that task in the stream's answer queue. The stream's writer awaits the tasks in
queue order, so responses leave in frame order whatever order the batches finished in, and every
frame that was read gets exactly one response, an error included.

After a batch's frames are answered, the line feedback (:mod:`server.feedback`) takes the batch on
its own thread: drift statistics per camera when the model carries a drift reference, and capture
of chosen frames for retraining (``--capture-dir``). ``GetLineStatus`` and ``/metrics`` report both.

Shutdown (:meth:`InspectionServer.stop`): health goes NOT_SERVING, new calls are refused with
UNAVAILABLE, every stream stops reading, every frame already read is answered, then the stream
ends with UNAVAILABLE so its camera knows to resend the rest elsewhere; the line feedback finishes
its batches and the capture writer saves what it holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from engine.backends.base import Backend
from engine.metadata import class_ids
from protos.inspection.v1 import inspection_pb2 as pb
from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from server.admission import Admission, FrameLease, release_all
from server.batcher import DynamicBatcher, FrameExpired, FrameResult, InferenceFailed
from server.config import MAX_CAMERA_ID_BYTES, ServerConfig, clip
from server.decode import FrameRejected, decode_request
from server.feedback import LineFeedback, LineFeedbackCollector
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from server.batcher import FinishedBatch

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InspectionService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_info(backend: Backend, max_batch: int) -> pb.ModelInfo:
    meta = backend.metadata
    return pb.ModelInfo(
        classes=[pb.DefectClass(class_id=k, name=n) for k, n in zip(meta.class_ids, meta.class_names)],
        input_height=meta.input_height,
        input_width=meta.input_width,
        thresholds=meta.thresholds,
        min_areas=meta.min_areas,
        backend=backend.name,
        precision=backend.precision,
        backend_selection=backend.selection,
        model_version=meta.model_version,
        device=backend.device,
        max_batch=max_batch,
        folds=meta.folds,
        encoder=meta.encoder,
        project_version=meta.project_version,
    )


def camera_id_fits(camera_id: str) -> bool:
    """Whether a camera id is within :data:`MAX_CAMERA_ID_BYTES` of UTF-8."""
    # More characters than bytes allowed is over without encoding a possibly huge string.
    return len(camera_id) <= MAX_CAMERA_ID_BYTES and len(camera_id.encode("utf-8")) <= MAX_CAMERA_ID_BYTES


def camera_id_problem(camera_id: str) -> str:
    size = len(camera_id) if len(camera_id) > MAX_CAMERA_ID_BYTES else len(camera_id.encode("utf-8"))
    return (f"camera_id is {'at least ' if len(camera_id) > MAX_CAMERA_ID_BYTES else ''}{size} bytes of UTF-8; "
            f"at most {MAX_CAMERA_ID_BYTES} are allowed")


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1e6))


class _CameraStream:
    """One Inspect call: a reader task feeding frame tasks into an ordered answer queue.

    Every frame read holds a lease from the server's :class:`Admission` (in ``leases`` until it is
    answered or abandoned); ``slots`` bounds this stream's share.
    """

    def __init__(self, server: InspectionServer, requests: AsyncIterator[pb.InspectRequest], deadline: float | None):
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
        self.reader: asyncio.Task[None] | None = None

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
                # Not reading while full is the backpressure: gRPC stops granting the camera
                # HTTP/2 flow-control window, so its writes wait instead of piling up here.
                lease = await server.admission.acquire(self.slots, owner=self.leases)
                self.read += 1
                self.last_frame = (request.camera_id, request.frame_id)
                self.answers.put_nowait((server._spawn_frame(request, self.deadline, received), lease))
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


class _Servicer(pb_grpc.InspectionServiceServicer):
    def __init__(self, server: InspectionServer) -> None:
        self.server = server

    async def Inspect(
        self, request_iterator: AsyncIterator[pb.InspectRequest], context: grpc.aio.ServicerContext
    ) -> None:
        # A coroutine writing with context.write (not an async generator): when the client cancels,
        # the cancellation lands inside this coroutine and the cleanup below runs at once.
        server = self.server
        await server._admit_call(context)
        stream = _CameraStream(server, request_iterator, server._deadline(context))
        server._call_started(stream)
        current: asyncio.Task[pb.InspectResponse] | None = None
        try:
            stream.reader = asyncio.get_running_loop().create_task(stream.read_frames())
            while (item := await stream.answers.get()) is not None:
                current, lease = item
                response = await current
                await context.write(response)
                stream.answered += 1
                lease.answered(response)
            await stream.reader  # re-raises a failed read (a broken stream)
            if stream.stopped_reading:
                log.info("event=stream_drained peer=%s frames_read=%d answered=%d", context.peer(), stream.read,
                         stream.answered)
                await context.abort(grpc.StatusCode.UNAVAILABLE, stream.drained_message())
        finally:
            # Client cancel, deadline, broken stream, a failed write, or this task cancelled: every
            # slot is released before the first await below, so a cancellation landing there
            # cannot leak one, and the call is counted as ended whatever happens to that await.
            abandoned = stream.abandon()
            if current is not None and not current.done():
                current.cancel()
                abandoned.append(current)
            try:
                await asyncio.gather(*abandoned, return_exceptions=True)
            finally:
                server._call_ended(stream)

    async def InspectOne(self, request: pb.InspectRequest, context: grpc.aio.ServicerContext) -> pb.InspectResponse:
        server = self.server
        received = time.perf_counter()
        await server._admit_call(context)
        lease = await server.admission.try_acquire()
        if lease is None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server saturated: {server.inflight} frames in flight (max {server.config.max_inflight}); "
                "retry later",
            )
        server._call_started(None)
        try:
            response = await server._inspect_frame(request, server._deadline(context), received)
            lease.answered(response)
            return response
        finally:
            lease.abandon()  # a no-op once answered
            server._call_ended(None)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        await self.server._admit_call(context, draining_ok=True)
        assert self.server._info is not None
        return self.server._info

    async def GetLineStatus(self, request: pb.GetLineStatusRequest, context: grpc.aio.ServicerContext) -> pb.LineStatus:
        await self.server._admit_call(context, draining_ok=True)
        return self.server.line_status(request.camera_id)


class InspectionServer:
    """A gRPC inspection server around one backend.

    Args:
        backend: a loaded :class:`Backend`, or a zero-argument callable returning one (called on
            the inference thread after the port is open, while health says NOT_SERVING; a backend
            made this way is closed by :meth:`stop`).
        config: listening, batching and limits.

    Example::

        server = InspectionServer(lambda: load_backend("model.onnx"), ServerConfig(port=0, metrics_port=0))
        await server.start()
        ...  # clients connect to f"127.0.0.1:{server.port}"
        await server.stop(grace=30)
    """

    def __init__(self, backend: Backend | Callable[[], Backend], config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self._backend_source = backend
        self.backend: Backend | None = backend if isinstance(backend, Backend) else None
        self.metrics = ServerMetrics()
        self.metrics.inflight_limit.set(self.config.max_inflight)
        #: Called on the event loop with each FinishedBatch once its frames are answered (the
        #: console's frame buffer, server/console.py); each must return at once.
        self.batch_listeners: list[Callable[[FinishedBatch], None]] = []
        self.feedback: LineFeedback | None = None
        self.metrics.registry.register(
            LineFeedbackCollector(lambda: self.feedback, max_cameras=self.config.max_metric_cameras)
        )
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self.admission = Admission(self.config.max_inflight, self.metrics)
        self._workers = ThreadPoolExecutor(self.config.decode_workers, thread_name_prefix="decode")
        self._inference_thread = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._batcher: DynamicBatcher | None = None
        self._info: pb.ModelInfo | None = None
        self._loading: asyncio.Task[None] | None = None
        self._ready = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._streams: set[_CameraStream] = set()
        self._active_calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._frame_tasks: set[asyncio.Task[pb.InspectResponse]] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        return f"{self.config.bind}:{self.port}"

    @property
    def inflight(self) -> int:
        """Frames read and not yet answered (what :class:`Admission` holds)."""
        return self.admission.inflight

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def stats(self) -> dict[str, int]:
        """Live counters: what a leak check looks at after cancelled or finished calls."""
        return {
            "open_streams": self.open_streams,
            "active_calls": self._active_calls,
            "inflight": self.inflight,
            "frame_tasks": len(self._frame_tasks),
            "queued": self._batcher.queued if self._batcher else 0,
            "accepted": self.admission.accepted,
            "answered": self.admission.answered,
            "abandoned": self.admission.abandoned,
        }

    async def start(self, wait_ready: bool = True) -> None:
        """Opens the port (health NOT_SERVING), then loads and warms up the model (health SERVING).

        Args:
            wait_ready: return only once the model serves (else call :meth:`wait_ready`).

        Raises:
            OSError: the address cannot be bound.
            FileNotFoundError: a TLS file is missing.
        """
        cfg = self.config
        limit = cfg.max_message_bytes
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
        )
        pb_grpc.add_InspectionServiceServicer_to_server(_Servicer(self), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc,
        )
        for service in ("", SERVICE_NAME):
            await self._health.set(service, NOT_SERVING)
        address = f"{cfg.bind}:{cfg.port}"
        try:
            if cfg.tls_cert is not None:
                self.port = self._grpc.add_secure_port(address, self._tls_credentials())
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        await self._grpc.start()
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.bind)
        log.info(
            "event=start address=%s tls=%s metrics_port=%s max_batch=%d max_delay_ms=%g max_inflight=%d",
            self.address, cfg.tls_cert is not None, self.metrics_port, cfg.max_batch, cfg.max_delay_ms,
            cfg.max_inflight,
        )
        self._loading = asyncio.get_running_loop().create_task(self._load())
        if wait_ready:
            try:
                await self.wait_ready()
            except BaseException:
                await self.stop(grace=0)
                raise

    def _tls_credentials(self) -> grpc.ServerCredentials:
        cfg = self.config
        files = {}
        for flag, path in (("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key)):
            if path is None or not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path}: no such file")
            files[flag] = Path(path).read_bytes()
        return grpc.ssl_server_credentials([(files["--tls-key"], files["--tls-cert"])])

    async def _load(self) -> None:
        try:
            await self._load_and_warm_up()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Health stays NOT_SERVING. The error is not logged here: it is raised to whoever awaits
            # start()/wait_ready() (``server serve`` prints it once, as its error line).
            log.debug("event=load_error error=%r", exc)
            raise

    async def _load_and_warm_up(self) -> None:
        started = time.perf_counter()
        cfg = self.config
        loop = asyncio.get_running_loop()
        if self.backend is None:
            factory = self._backend_source
            self.backend = await loop.run_in_executor(self._inference_thread, factory)  # type: ignore[arg-type]
        backend = self.backend
        self.feedback = LineFeedback(
            backend.metadata, drift_window=cfg.drift_window, drift_min_frames=cfg.drift_min_frames,
            psi_threshold=cfg.drift_psi_threshold, ks_threshold=cfg.drift_ks_threshold,
            drift_max_cameras=cfg.drift_max_cameras, max_status_cameras=cfg.max_status_cameras,
            capture=cfg.capture, metrics=self.metrics,
        )
        self._batcher = DynamicBatcher(
            backend, cfg.max_batch, cfg.max_delay_ms / 1000.0, self._workers, self.metrics, self._inference_thread,
            on_batch=self._batch_finished,
        )
        if cfg.warmup:
            sizes = tuple(sorted({1, self._batcher.max_batch}))
            await self._batcher.run_on_backend_thread(backend.warmup, sizes)
        self._info = model_info(backend, self._batcher.max_batch)
        self._batcher.start()
        self._ready = True
        if not self._stopping:
            for service in ("", SERVICE_NAME):
                await self._health.set(service, SERVING)
            self.metrics.serving.set(1)
        meta = backend.metadata
        log.info(
            "event=ready model_version=%s backend=%s device=%s precision=%s input=%dx%d classes=%d "
            "max_batch=%d load_s=%.2f",
            meta.model_version, backend.name, backend.device, backend.precision, meta.input_width,
            meta.input_height, meta.num_classes, self._batcher.max_batch, time.perf_counter() - started,
        )

    def _batch_finished(self, batch: FinishedBatch) -> None:
        if self.feedback is not None and self.feedback.active:
            self.feedback.submit(batch)
        for listener in self.batch_listeners:
            listener(batch)

    async def wait_ready(self) -> None:
        """Waits for the model to load; re-raises what made loading fail."""
        if self._loading is None:
            raise RuntimeError("the server has not been started")
        await asyncio.shield(self._loading)

    def line_status(self, camera_id: str = "") -> pb.LineStatus:
        """Drift per camera (every camera, or ``camera_id``'s) and capture counters."""
        if self.feedback is None:
            raise RuntimeError("the model is not loaded yet")
        return self.feedback.status(camera_id)

    async def stop(self, grace: float = 30.0) -> None:
        """Graceful shutdown: refuse new calls, answer every frame already read, then close.

        Args:
            grace: seconds to wait for accepted frames; calls still open after it are cancelled.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        started = time.perf_counter()
        log.info("event=stopping open_streams=%d inflight=%d grace_s=%g", self.open_streams, self.inflight, grace)
        await self._health.enter_graceful_shutdown()
        self.metrics.serving.set(0)
        for stream in list(self._streams):
            stream.stop_reading()
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            log.warning("event=grace_expired active_calls=%d inflight=%d", self._active_calls, self.inflight)
        if self._grpc is not None:
            # Our calls are done; the short grace lets their final status reach the clients, then
            # it ends what is left (health Watch streams never end on their own).
            await self._grpc.stop(1.0)
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self._loading is not None:
            await asyncio.gather(self._loading, return_exceptions=True)
        if self._batcher is not None:
            await self._batcher.close()
        loop = asyncio.get_running_loop()
        if self.feedback is not None:
            # After the drain: the last batches' statistics are in and every chosen frame is on disk.
            await loop.run_in_executor(None, self.feedback.close)
        await loop.run_in_executor(None, self._inference_thread.shutdown, True)
        await loop.run_in_executor(None, self._workers.shutdown, True)
        if self.backend is not None and self.backend is not self._backend_source:
            self.backend.close()
        self.metrics.close()
        log.info(
            "event=stop accepted=%d answered=%d abandoned=%d stop_s=%.2f",
            self.admission.accepted, self.admission.answered, self.admission.abandoned,
            time.perf_counter() - started,
        )
        self._stopped.set()

    # ------------------------------------------------------------------ per call

    async def _admit_call(self, context: grpc.aio.ServicerContext, draining_ok: bool = False) -> None:
        if self._stopping and not draining_ok:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; connect to another server")
        if not self._ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is loading; retry when health says SERVING")

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else asyncio.get_running_loop().time() + remaining

    def _call_started(self, stream: _CameraStream | None) -> None:
        self._active_calls += 1
        self._idle.clear()
        if stream is not None:
            self._streams.add(stream)
            self.metrics.open_streams.set(len(self._streams))
            if self._stopping:  # raced with stop(): it must not read anything
                stream.stop_reading()

    def _call_ended(self, stream: _CameraStream | None) -> None:
        self._active_calls -= 1
        if stream is not None:
            self._streams.discard(stream)
            self.metrics.open_streams.set(len(self._streams))
        if self._active_calls == 0:
            self._idle.set()

    def _spawn_frame(
        self, request: pb.InspectRequest, deadline: float | None, received: float
    ) -> asyncio.Task[pb.InspectResponse]:
        task = asyncio.get_running_loop().create_task(self._inspect_frame(request, deadline, received))
        self._frame_tasks.add(task)
        task.add_done_callback(self._frame_tasks.discard)
        return task

    async def _inspect_frame(
        self, request: pb.InspectRequest, deadline: float | None, received: float
    ) -> pb.InspectResponse:
        """Decode, batch, infer, encode: one response for one frame, never an exception."""
        assert self._batcher is not None and self.backend is not None
        meta = self.backend.metadata
        loop = asyncio.get_running_loop()
        if not camera_id_fits(request.camera_id):
            return self._error(request, grpc.StatusCode.INVALID_ARGUMENT, camera_id_problem(request.camera_id),
                               received)
        try:
            start = time.perf_counter()
            frame = await loop.run_in_executor(
                self._workers, decode_request, request, meta.input_size, self.config.max_frame_pixels
            )
            decode_s = time.perf_counter() - start
            self.metrics.decode_seconds.observe(decode_s)
            result = await self._batcher.submit(frame, deadline, request.camera_id, request)
        except FrameRejected as exc:
            return self._error(request, grpc.StatusCode.INVALID_ARGUMENT, str(exc), received)
        except FrameExpired as exc:
            return self._error(request, grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), received)
        except InferenceFailed as exc:
            return self._error(request, grpc.StatusCode.INTERNAL, str(exc), received)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a frame's failure is answered, never raised into the stream
            log.exception("event=frame_error camera=%r frame=%d", clip(request.camera_id), request.frame_id)
            return self._error(request, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", received)
        return self._response(request, result, decode_s, received)

    def _response(
        self, request: pb.InspectRequest, result: FrameResult, decode_s: float, received: float
    ) -> pb.InspectResponse:
        total_s = time.perf_counter() - received
        self.metrics.total_seconds.observe(total_s)
        return pb.InspectResponse(
            camera_id=request.camera_id,
            frame_id=request.frame_id,
            defects=[
                pb.DefectResult(class_id=k, present=present, pixel_count=count, rle=rle)
                for k, present, count, rle in zip(
                    class_ids(len(result.counts)), result.present, result.counts, result.rles
                )
            ],
            model_version=self._info.model_version if self._info else "",
            timings=pb.Timings(
                queue_us=_us(result.queue_s),
                inference_us=_us(result.inference_s),
                postprocess_us=_us(result.postprocess_s),
                total_us=_us(total_s),
                decode_us=_us(decode_s),
                batch_size=result.batch_size,
            ),
        )

    def _error(
        self, request: pb.InspectRequest, code: grpc.StatusCode, reason: str, received: float
    ) -> pb.InspectResponse:
        # The id is quoted cut short, and not echoed at all when over its bound: nothing a camera
        # sends can make an answer larger than the message size limit.
        message = f"camera {clip(request.camera_id)!r} frame {request.frame_id}: {reason}"
        log.warning("event=frame_error code=%s %s", code.name, message)
        total_s = time.perf_counter() - received
        self.metrics.total_seconds.observe(total_s)
        return pb.InspectResponse(
            camera_id=request.camera_id if camera_id_fits(request.camera_id) else "",
            frame_id=request.frame_id,
            error=pb.FrameError(code=code.value[0], message=message),
            model_version=self._info.model_version if self._info else "",
            timings=pb.Timings(total_us=_us(total_s)),
        )


__all__ = ["InspectionServer", "ServerConfig", "model_info", "SERVICE_NAME"]
