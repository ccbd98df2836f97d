"""The inspection service: ``InspectionServer(backend, config)``, usable as a library and by ``server serve``.

Life of a frame: an ``Inspect`` call (:mod:`server.calls`) reads it off the wire (:mod:`server.wire`
parses it) and hands it to a frame task: decode in the worker pool -> dynamic batcher -> inference
thread -> RLE in the worker pool. Answers leave in frame order, one per frame read, an error included.

After a batch's frames are answered, the line feedback (:mod:`server.feedback`) takes the batch on
its own thread: drift statistics per camera when the model carries a drift reference, and capture
of chosen frames for retraining (``--capture-dir``). ``GetLineStatus`` and ``/metrics`` report both.

Shutdown (:meth:`InspectionServer.stop`): health goes NOT_SERVING, new calls are refused with
UNAVAILABLE, every stream stops reading, every frame already read is answered, then the stream
ends with UNAVAILABLE (and the trailer saying "resend") so its camera resends the rest elsewhere; the line feedback finishes
its batches and the capture writer saves what it holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from engine.backends.base import Backend
from protos.inspection.v1 import inspection_pb2 as pb
from server.admission import Admission
from server.auth import server_credentials
from server.batcher import DynamicBatcher, FrameExpired, FrameNotRecorded, InferenceFailed
from server.calls import CameraCall, Servicer
from server.config import ServerConfig, clip
from server.decode import FrameRejected, decode_request
from server.feedback import LineFeedback, LineFeedbackCollector
from server.metrics import ServerMetrics
from server.wire import (
    SERVICE_NAME,
    UnreadableRequest,
    add_servicer,
    camera_id_fits,
    camera_id_problem,
    coil_problem,
    end_stream,
    frame_error,
    frame_response,
    line_message,
    model_info,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from coils.grading import Grading
    from server.batcher import FinishedBatch
    from server.coil_tracker import CoilTracker
    from server.line_actions import LineActions

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class InspectionServer:
    """A gRPC inspection server around one backend.

    Args:
        backend: a loaded :class:`Backend`, or a zero-argument callable returning one (called on
            the inference thread after the port is open, while health says NOT_SERVING; a backend
            made this way is closed by :meth:`stop`).
        config: listening, batching and limits.
        model_version: names the model in answers and ``GetModelInfo`` (a model repository's
            version); None: the model's own metadata version.

    Example::

        server = InspectionServer(lambda: load_backend("model.onnx"), ServerConfig(port=0, metrics_port=0))
        await server.start()
        ...  # clients connect to f"127.0.0.1:{server.port}"
        await server.stop(grace=30)
    """

    def __init__(self, backend: Backend | Callable[[], Backend], config: ServerConfig | None = None,
                 model_version: str | None = None) -> None:
        self.config = config or ServerConfig()
        self.model_label = model_version
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
        self.info: pb.ModelInfo | None = None  # GetModelInfo's answer, once loaded
        #: GetLine's answer: the line description (``--line``), None without one.
        self.line_info: pb.Line | None = line_message(self.config.line) if self.config.line else None
        #: Coil tracking (``--coil-db``), opened by :meth:`start`; None without it.
        self.coils: CoilTracker | None = None
        #: The coil grades of ``--grading`` (set once the model's classes are known); None without.
        self.grading: Grading | None = None
        #: Grades, alarms and OPC UA (``--grading``, ``--opcua-endpoint``), started with the model.
        self.line_actions: LineActions | None = None
        self._loading: asyncio.Task[None] | None = None
        self._ready = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._streams: set[CameraCall] = set()
        self._active_calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._frame_tasks: set[asyncio.Task[pb.InspectResponse]] = set()
        #: Called with the gRPC server before it starts, to add services on the same port (ModelControl).
        self.extra_services: list[Callable[[grpc.aio.Server], None]] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        return f"{self.config.bind}:{self.port}"

    @property
    def inflight(self) -> int:
        """Frames read and not yet answered (what :class:`Admission` holds)."""
        return self.admission.inflight

    @property
    def batcher(self) -> DynamicBatcher | None:
        """The dynamic batcher, once the model is loaded (server.models swaps its backend)."""
        return self._batcher

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
        await self._open_coil_tracking()
        limit = cfg.max_message_bytes
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
        )
        add_servicer(Servicer(self), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        for add_service in self.extra_services:
            add_service(self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc,
        )
        for service in ("", SERVICE_NAME):
            await self._health.set(service, NOT_SERVING)
        address = f"{cfg.bind}:{cfg.port}"
        try:
            if cfg.tls_cert is not None:
                self.port = self._grpc.add_secure_port(address, server_credentials(cfg))
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            await self._close_coil_tracking()
            raise OSError(f"cannot listen on {address}: {exc}") from None
        except BaseException:
            await self._close_coil_tracking()
            raise
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

    async def _open_coil_tracking(self) -> None:
        """Opens the coil database and spool (``--coil-db``) before the port: a bad URL fails the start."""
        tracking = self.config.coil_tracking()
        if tracking is None or self.coils is not None:
            return
        from server.coil_tracker import CoilTracker

        assert self.config.line is not None  # ServerConfig checks --coil-db has --line
        self.coils = await asyncio.get_running_loop().run_in_executor(
            None, CoilTracker.open, tracking, self.config.line, self.metrics)

    async def _close_coil_tracking(self) -> None:
        if self.coils is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.coils.close)

    async def _commit_coils(self, batch: FinishedBatch) -> list[Exception | None]:
        """The batcher's ``before_answer``: the batch's coil frames stored (or spooled) before its answers."""
        assert self.coils is not None
        if not any(getattr(source, "coil_id", "") for source in batch.sources):
            return [None] * len(batch.sources)
        return await asyncio.get_running_loop().run_in_executor(self.coils.writer, self.coils.commit, batch)

    def _check_line_frames(self, backend: Backend) -> None:
        """With coil tracking, every camera of the line must send frames of the model's size."""
        if self.coils is None:
            return
        height, width = backend.metadata.input_height, backend.metadata.input_width
        for camera in self.coils.line.cameras:
            if (camera.frame_height_px, camera.frame_width_px) != (height, width):
                raise ValueError(
                    f"--line: camera {camera.camera_id!r} sends {camera.frame_height_px}x{camera.frame_width_px} "
                    f"frames (height x width), the model takes {height}x{width}: coil tracking places the model's "
                    "masks with the camera's geometry, so the two must agree")

    async def _start_line_actions(self, backend: Backend) -> None:
        from server.line_actions import LineActions

        self.line_actions = await LineActions.start(self, list(backend.metadata.class_names))

    def is_serving(self) -> bool:
        """True while the model is loaded and the server is not shutting down."""
        return self._ready and not self._stopping

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
        self._check_line_frames(backend)
        await self._start_line_actions(backend)
        version = self.model_label or backend.metadata.model_version
        self.feedback = LineFeedback(
            backend.metadata, drift_window=cfg.drift_window, drift_min_frames=cfg.drift_min_frames,
            psi_threshold=cfg.drift_psi_threshold, ks_threshold=cfg.drift_ks_threshold,
            drift_max_cameras=cfg.drift_max_cameras, max_status_cameras=cfg.max_status_cameras,
            capture=cfg.capture, metrics=self.metrics, model_version=version,
        )
        self._batcher = DynamicBatcher(
            backend, cfg.max_batch, cfg.max_delay_ms / 1000.0, self._workers, self.metrics, self._inference_thread,
            on_batch=self._batch_finished, before_answer=self._commit_coils if self.coils is not None else None,
            model_version=version,
        )
        if cfg.warmup:
            sizes = tuple(sorted({1, self._batcher.max_batch}))
            await self._batcher.run_on_backend_thread(backend.warmup, sizes)
        self.info = model_info(backend, self._batcher.max_batch, self._batcher.model_version)
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
        if self.feedback is not None:
            self.feedback.submit(batch)  # it follows the batch's model, and skips what needs no work
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
        status = self.feedback.status(camera_id)
        if self.coils is not None:
            status.coils.CopyFrom(pb.CoilTrackingStatus(**self.coils.status()))
        else:
            status.coils.db_state = "off (server serve --coil-db)"
        return status

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
        if self.line_actions is not None:
            await self.line_actions.stop()
        loop = asyncio.get_running_loop()
        if self.feedback is not None:
            # After the drain: the last batches' statistics are in and every chosen frame is on disk.
            await loop.run_in_executor(None, self.feedback.close)
        await self._close_coil_tracking()  # after the batcher: every answered frame is committed
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

    async def admit_call(self, context: grpc.aio.ServicerContext, draining_ok: bool = False) -> None:
        """Ends a call the server cannot take now (shutting down, model loading): UNAVAILABLE, resend later."""
        if self._stopping and not draining_ok:
            await end_stream(context, grpc.StatusCode.UNAVAILABLE, "server is shutting down; connect to another "
                             "server", resend=True)
        if not self._ready:
            await end_stream(context, grpc.StatusCode.UNAVAILABLE, "model is loading; retry when health says SERVING",
                             resend=True)

    @staticmethod
    def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else asyncio.get_running_loop().time() + remaining

    def call_started(self, stream: CameraCall | None) -> None:
        self._active_calls += 1
        self._idle.clear()
        if stream is not None:
            self._streams.add(stream)
            self.metrics.open_streams.set(len(self._streams))
            if self._stopping:  # raced with stop(): it must not read anything
                stream.stop_reading()

    def call_ended(self, stream: CameraCall | None) -> None:
        self._active_calls -= 1
        if stream is not None:
            self._streams.discard(stream)
            self.metrics.open_streams.set(len(self._streams))
        if self._active_calls == 0:
            self._idle.set()

    def spawn_frame(self, request: pb.InspectRequest | UnreadableRequest, deadline: float | None,
                    received: float) -> asyncio.Task[pb.InspectResponse]:
        task = asyncio.get_running_loop().create_task(self.inspect_frame(request, deadline, received))
        self._frame_tasks.add(task)
        task.add_done_callback(self._frame_tasks.discard)
        return task

    async def inspect_frame(self, request: pb.InspectRequest | UnreadableRequest, deadline: float | None,
                            received: float) -> pb.InspectResponse:
        """Decode, batch, infer, encode: one response for one frame, never an exception."""
        assert self._batcher is not None and self.backend is not None
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if isinstance(request, UnreadableRequest):
            return self._error(request, invalid, request.problem, received)
        if not camera_id_fits(request.camera_id):
            return self._error(request, invalid, camera_id_problem(request.camera_id), received)
        if (problem := coil_problem(request)) is not None:
            return self._error(request, invalid, problem, received)
        if request.coil_id:
            if self.coils is not None and (problem := self._unknown_camera(request.camera_id)) is not None:
                return self._error(request, invalid, problem, received)
            self.metrics.coil_frames.inc()
        try:
            start = time.perf_counter()
            frame = await asyncio.get_running_loop().run_in_executor(
                self._workers, decode_request, request, self.backend.metadata.input_size, self.config.max_frame_pixels
            )
            decode_s = time.perf_counter() - start
            self.metrics.decode_seconds.observe(decode_s)
            result = await self._batcher.submit(frame, deadline, request.camera_id, request)
        except FrameRejected as exc:
            return self._error(request, invalid, str(exc), received)
        except FrameExpired as exc:
            return self._error(request, grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), received)
        except InferenceFailed as exc:
            return self._error(request, grpc.StatusCode.INTERNAL, str(exc), received)
        except FrameNotRecorded as exc:
            return self._error(request, grpc.StatusCode.UNAVAILABLE, str(exc), received)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a frame's failure is answered, never raised into the stream
            log.exception("event=frame_error camera=%r frame=%d", clip(request.camera_id), request.frame_id)
            return self._error(request, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", received)
        total_s = self._observe_total(received)
        return frame_response(request, result, result.model_version, decode_s, total_s)

    def _unknown_camera(self, camera_id: str) -> str | None:
        """Why a coil frame of ``camera_id`` cannot be placed on its coil, or None."""
        assert self.coils is not None
        known = [c.camera_id for c in self.coils.line.cameras]
        if camera_id in known:
            return None
        return (f"camera {clip(camera_id)!r} is not in the line description (--line lists "
                f"{', '.join(map(repr, known[:8]))}{'...' if len(known) > 8 else ''}): its coil frames cannot be "
                "placed on the coil")

    @property
    def _model_version(self) -> str:
        return self._batcher.model_version if self._batcher else ""

    def _observe_total(self, received: float) -> float:
        total_s = time.perf_counter() - received
        self.metrics.total_seconds.observe(total_s)
        return total_s

    def _error(self, request: pb.InspectRequest | UnreadableRequest, code: grpc.StatusCode, reason: str,
               received: float) -> pb.InspectResponse:
        return frame_error(request, code, reason, self._model_version, self._observe_total(received))


__all__ = ["InspectionServer", "ServerConfig", "model_info", "SERVICE_NAME"]
