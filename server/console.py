"""The line operator's live console: one web page per server (``server serve --console-port N``).

Per camera the page shows the latest frame with its predicted masks drawn over it (the one drawing,
:func:`engine.overlay.draw_prediction` at display size), the last defective frames as thumbnails, the defect rate per
class over the last minutes, and the server's load, errors, drift, capture counters and model.

How it stays off the inspection's hot path:

* :meth:`Console.observe` is the server's batch listener (``InspectionServer.batch_listeners``):
  it keeps references per camera in :class:`server.console_buffer.CameraBuffer` (at most
  ``max_cameras`` cameras, the least recently seen making room). No drawing, no encoding.
* A background task wakes ``refresh_hz`` times a second, and does nothing unless a viewer is
  connected or ``/api/state`` was asked for lately. Then it draws and JPEG-encodes, on its own
  thread, only the frames the page will show, each ONCE and at most ``encodes_per_s`` a second
  over all cameras, and caches the JSON state: every viewer and every ``/api/state`` request gets
  that cached state, and an image request is served only from the images already encoded, so
  nothing a client does makes the console encode more.
* Connections are bounded and timed out (:mod:`server.console_connections`), and a viewer whose
  events cannot be written for ``idle_timeout_s`` is closed, so the console's clients cannot take
  the file descriptors or memory the inspection needs.

The page (``server/console_static/index.html``) is one static file of HTML and vanilla JS; no
front-end build step. aiohttp serves it on the server's own event loop (grpc.aio's).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.console_alarms import AlarmBanner
from server.console_buffer import CameraBuffer, Shot, newer
from server.console_coils import CoilPages
from server.console_connections import ConnectionGuard
from server.console_state import camera_state, latency_buckets, models_state, server_state

if TYPE_CHECKING:
    from aiohttp import web

    from server.batcher import FinishedBatch
    from server.models import ModelManager
    from server.service import InspectionServer

log = logging.getLogger(__name__)

STATIC_PAGE = "console_static/index.html"  # package data of ``server``
#: Cameras the console shows by default; a new camera takes the place of the one seen least recently.
MAX_CAMERAS = 64
#: Seconds of load history behind frames/s and p95 latency.
LOAD_WINDOW_S = 10.0
#: Seconds the state keeps being refreshed after an ``/api/state`` request (with no viewer connected).
STATE_WANTED_S = 10.0
JPEG_QUALITY = 80


def add_arguments(parser: Any) -> None:
    """``server serve``'s console flags."""
    group = parser.add_argument_group("live console")
    group.add_argument("--console-port", type=int, default=None, metavar="N",
                       help="serve the live web console at http://BIND:N/ (https with --tls-cert); 0 picks a "
                       "free port (default: off)")


@dataclass(frozen=True)
class ConsoleConfig:
    """Where the console listens and what it keeps.

    Attributes:
        port: HTTP(S) port; 0 picks a free one.
        bind: address; loopback unless told otherwise, like the gRPC port.
        tls_cert, tls_key: PEM files: serve HTTPS (``server serve`` passes its gRPC TLS pair).
        refresh_hz: page updates per second while a viewer is connected.
        thumbnails: last defective frames kept per camera.
        history_s: seconds of defect-rate history per camera.
        bucket_s: width of one defect-rate bucket, seconds.
        display_width: width the live frame is drawn at (the frame's own when smaller).
        thumbnail_width: width of a thumbnail.
        encodes_per_s: most images drawn and encoded per second, over all cameras (with many
            cameras each one's frame refreshes less often; the inspection's CPU stays its own).
        max_cameras: cameras shown; a new one takes the place of the one seen least recently.
        max_connections: console connections held at once; further ones are closed at once.
        header_timeout_s: seconds a connection has to send its request headers (and finish TLS).
        idle_timeout_s: seconds a connection may sit idle between requests, and a viewer may not
            take its events, before it is closed.
    """

    port: int = 0
    bind: str = "127.0.0.1"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    refresh_hz: float = 2.0
    thumbnails: int = 6
    history_s: float = 300.0
    bucket_s: float = 10.0
    display_width: int = 800
    thumbnail_width: int = 320
    encodes_per_s: float = 4.0
    max_cameras: int = MAX_CAMERAS
    max_connections: int = 128
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"console port (--console-port) must lie in 0..65535, got {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("console TLS needs both a certificate and its private key")
        if not 0 < self.refresh_hz <= 20:
            raise ValueError(f"refresh_hz must lie in (0, 20], got {self.refresh_hz}")
        if not self.encodes_per_s > 0:
            raise ValueError(f"encodes_per_s must be positive, got {self.encodes_per_s}")
        if self.thumbnails < 0 or self.display_width < 16 or self.thumbnail_width < 16:
            raise ValueError("thumbnails must be >= 0, display_width and thumbnail_width >= 16")
        if not 0 < self.bucket_s <= self.history_s:
            raise ValueError(f"bucket_s must lie in (0, history_s={self.history_s}], got {self.bucket_s}")
        if self.max_cameras < 1 or self.max_connections < 1:
            raise ValueError("max_cameras and max_connections must be >= 1")
        if not (self.header_timeout_s > 0 and self.idle_timeout_s > 0):
            raise ValueError("header_timeout_s and idle_timeout_s must be positive")


def _lowest_priority() -> None:
    """Runs the encoder thread at the lowest CPU priority (Linux: a thread's own nice value), so a
    busy CPU serves inference first and the console's pictures wait."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed
        log.debug("console encoder keeps its priority: %s", exc)


def _offer(queue: asyncio.Queue[str | None], message: str | None) -> None:
    """Puts ``message`` in a viewer's one-slot queue, replacing what it has not taken yet: a slow
    viewer gets the newest state (or the end), not a backlog, and a full queue never raises."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(message)


class Console:
    """The console of one :class:`InspectionServer`.

    Example::

        console = Console(server, ConsoleConfig(port=8080))
        await console.start()          # after server.start(); registers the batch listener
        ...                            # http://127.0.0.1:8080/
        await console.stop()
    """

    def __init__(self, server: InspectionServer, config: ConsoleConfig | None = None,
                 models: ModelManager | None = None) -> None:
        self.server = server
        self.models = models  # production, candidate, shadow run and audit log shown when given
        self.config = config or ConsoleConfig()
        cfg = self.config
        self.port: int | None = None
        self.buffer = CameraBuffer(cfg.max_cameras, cfg.thumbnails, cfg.bucket_s, cfg.history_s)
        self._viewers: set[asyncio.Queue[str | None]] = set()
        self._images: dict[tuple[int, str], asyncio.Future[bytes]] = {}
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="console-encode", initializer=_lowest_priority)
        self._load: deque[tuple[float, int, dict[str, int], np.ndarray]] = deque()
        self._last_state: str | None = None
        self._last_state_at = 0.0  # time.monotonic()
        self._state_wanted_until = 0.0  # time.monotonic(): /api/state keeps the refresh running until then
        self._refreshed = asyncio.Event()
        self._refresh: asyncio.Task[None] | None = None
        self._runner: Any = None
        self.connections: ConnectionGuard | None = None
        self.coil_pages = CoilPages(server)  # /coils, /coils/<id>
        self.encoded = 0  # images encoded, over all viewers (each at most once)
        self.updates = 0  # states made (one per tick with viewers or /api/state clients)

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert is not None else "http"
        return f"{scheme}://{self.config.bind}:{self.port}/"

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    def observe(self, batch: FinishedBatch) -> None:
        """The server's batch listener: keeps references to a finished batch's frames (O(1) per frame)."""
        self.buffer.observe(batch)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Starts the web server and the refresh task; returns the port.

        Raises:
            OSError: the address cannot be bound.
            FileNotFoundError: a TLS file is missing.
        """
        try:
            from aiohttp import web
        except ImportError as exc:
            raise RuntimeError(f"the console needs aiohttp ({exc}): pip install -e '.[serve]'") from None

        cfg = self.config
        ssl_context = self._ssl_context()

        @web.middleware
        async def timeouts(request: web.Request, handler: Any) -> web.StreamResponse:
            assert self.connections is not None
            return await self.connections.middleware(request, handler)

        app = web.Application(middlewares=[timeouts])
        app.add_routes([
            web.get("/", self._index),
            web.get("/events", self._events),
            web.get("/api/state", self._state_json),
            # At most 18 digits: a longer number is no frame (and int() of thousands of digits raises).
            web.get(r"/frames/{seq:\d{1,18}}.jpg", self._frame_image),
            web.get(r"/thumbs/{seq:\d{1,18}}.jpg", self._thumb_image),
            *self.coil_pages.routes(),
            *AlarmBanner(self.server).routes(),
        ])
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, keepalive_timeout=cfg.idle_timeout_s)
        await self._runner.setup()
        self.connections = ConnectionGuard(self._runner.server, cfg.max_connections, cfg.header_timeout_s,
                                           cfg.idle_timeout_s, ssl_context)
        try:
            self.port = await self.connections.listen(cfg.bind, cfg.port)
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"console cannot listen on {cfg.bind}:{cfg.port}: {exc}") from None
        self.server.batch_listeners.append(self.observe)
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_loop())
        log.info("event=console_start url=%s refresh_hz=%g max_connections=%d", self.url, cfg.refresh_hz,
                 cfg.max_connections)
        return self.port

    def _ssl_context(self) -> ssl.SSLContext | None:
        cfg = self.config
        if cfg.tls_cert is None or cfg.tls_key is None:
            return None
        for flag, path in (("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path}: no such file")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        return context

    async def stop(self) -> None:
        """Ends every viewer's event stream and closes every connection (a viewer that stopped
        reading included), then the web server and the encoder thread."""
        if self.observe in self.server.batch_listeners:
            self.server.batch_listeners.remove(self.observe)
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        for queue in list(self._viewers):
            _offer(queue, None)
        if self.connections is not None:
            self.connections.close()
            await asyncio.sleep(0.1)  # viewers that read take their end of stream
            await self.connections.abort_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.get_running_loop().run_in_executor(None, self._encoder.shutdown, True)
        self.coil_pages.close()
        log.info("event=console_stop encoded=%d updates=%d viewers=%d", self.encoded, self.updates, len(self._viewers))

    # ------------------------------------------------------------------ refresh

    def _wanted(self) -> bool:
        return bool(self._viewers) or time.monotonic() < self._state_wanted_until

    async def _refresh_loop(self) -> None:
        period = 1.0 / self.config.refresh_hz
        while True:
            await asyncio.sleep(period)
            if not self._wanted():
                continue
            try:
                state = await self.state()
            except Exception:  # noqa: BLE001 - the console must never take the server down
                log.exception("event=console_refresh_error")
                continue
            self._last_state, self._last_state_at = json.dumps(state), time.monotonic()
            self.updates += 1
            for queue in self._viewers:
                _offer(queue, self._last_state)
            self._refreshed.set()
            self._refreshed = asyncio.Event()

    async def state(self) -> dict[str, Any]:
        """What the page shows, as JSON-ready data: frames and thumbnails whose images are ready.

        Encodes up to one tick's budget of images: the refresh task is its only caller."""
        self._sample_load()
        await self._encode_some()
        cfg, buffer = self.config, self.buffer
        cameras = [
            camera_state(camera, [s for s in camera.defective if self._ready(s, "thumb")], cfg.bucket_s,
                         cfg.history_s, self._load)
            for camera in buffer.cameras.values()
        ]
        return {"time": time.time(), **server_state(self.server, self._load), **models_state(self.models),
                "cameras": cameras,
                "max_cameras": cfg.max_cameras, "cameras_not_shown": len(buffer.hidden),
                "cameras_evicted": buffer.evicted}

    async def _encode_some(self) -> None:
        """Encodes the images the page lacks, at most the tick's budget: cameras' latest frames
        first (the one refreshed longest ago first), then new thumbnails. A camera keeps showing
        its previous frame until its turn comes."""
        wanted = []
        for camera in self.buffer.cameras.values():
            if camera.latest is not None and camera.latest is not camera.shown:
                wanted.append((0, camera.shown_at, camera, camera.latest, "frame"))
            wanted.extend((1, s.time, camera, s, "thumb") for s in camera.defective if (s.seq, "thumb") not in self._images)
        wanted.sort(key=lambda item: item[:2])
        budget = max(1, round(self.config.encodes_per_s / self.config.refresh_hz))
        chosen = wanted[:budget]
        results = await asyncio.gather(*(self._image(shot, kind) for *_, shot, kind in chosen), return_exceptions=True)
        now = time.monotonic()
        for (_, _, camera, shot, kind), result in zip(chosen, results):
            if isinstance(result, BaseException):
                log.error("event=console_image_error camera=%r frame=%d error=%r", shot.camera_id, shot.frame_id,
                          result)
            elif kind == "frame" and (camera.shown is None or newer(shot, camera.shown)):
                camera.shown, camera.shown_at = shot, now
        self._forget_images()

    def _ready(self, shot: Shot, kind: str) -> bool:
        future = self._images.get((shot.seq, kind))
        return future is not None and future.done() and future.exception() is None

    def _sample_load(self) -> None:
        """One sample of the counters behind frames/s and p95 latency (kept for LOAD_WINDOW_S)."""
        now = time.monotonic()
        frames = {camera_id: camera.frames for camera_id, camera in self.buffer.cameras.items()}
        self._load.append((now, self.server.stats()["answered"], frames, latency_buckets(self.server.metrics)))
        while len(self._load) > 2 and self._load[1][0] <= now - LOAD_WINDOW_S:
            self._load.popleft()

    # ------------------------------------------------------------------ images

    def _image(self, shot: Shot, kind: str) -> asyncio.Future[bytes]:
        """The JPEG of a shot (``frame``: display size, ``thumb``: thumbnail), encoded at most once."""
        key = (shot.seq, kind)
        future = self._images.get(key)
        if future is None:
            width = self.config.display_width if kind == "frame" else self.config.thumbnail_width
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._encoder, self._encode, shot, width)
            self._images[key] = future
        return future

    def _encode(self, shot: Shot, width: int) -> bytes:
        """Draws and encodes one shot (on the encoder thread)."""
        import cv2

        from engine.overlay import draw_prediction
        from engine.rle import decode_many

        h, w = shot.frame.shape
        masks = decode_many(shot.rles, h, w)
        size = (max(1, round(h * min(w, width) / w)), min(w, width))
        picture = draw_prediction(shot.frame, masks, shot.present.tolist(), size=size)
        ok, data = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"cannot encode camera {shot.camera_id!r} frame {shot.frame_id} as JPEG")
        self.encoded += 1
        return data.tobytes()

    def _forget_images(self) -> None:
        keep = {s.seq for s in self.buffer.retained()}
        for key in [k for k in self._images if k[0] not in keep]:
            del self._images[key]

    # ------------------------------------------------------------------ HTTP

    async def _index(self, request: web.Request) -> web.Response:
        from aiohttp import web

        page = resources.files("server").joinpath(STATIC_PAGE).read_text(encoding="utf-8")
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one ``data:`` line of JSON state per refresh while connected. A viewer
        that does not take an event within ``idle_timeout_s`` (stopped reading) is closed."""
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=1)
        self._viewers.add(queue)
        log.info("event=console_viewer_open viewers=%d peer=%s", len(self._viewers), request.remote)
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.config.idle_timeout_s) as timer:  # only while writing
                await response.write(b"retry: 2000\n\n")
                if self._last_state is not None:
                    await response.write(f"data: {self._last_state}\n\n".encode())
                timer.reschedule(None)
                while (message := await queue.get()) is not None:
                    timer.reschedule(loop.time() + self.config.idle_timeout_s)
                    await response.write(f"data: {message}\n\n".encode())
                    timer.reschedule(None)
        except TimeoutError:
            log.warning("event=console_viewer_stalled peer=%s: no event taken for %g s; closed", request.remote,
                        self.config.idle_timeout_s)
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self._viewers.discard(queue)
            log.info("event=console_viewer_close viewers=%d", len(self._viewers))
        return response

    async def _state_json(self, request: web.Request) -> web.Response:
        """The cached state (the one the viewers get); waits for the next refresh when it is stale."""
        from aiohttp import web

        period = 1.0 / self.config.refresh_hz
        self._state_wanted_until = time.monotonic() + STATE_WANTED_S
        if self._last_state is None or time.monotonic() - self._last_state_at > 2 * period:
            try:
                await asyncio.wait_for(self._refreshed.wait(), timeout=2 * period + 1.0)
            except TimeoutError:
                pass
        if self._last_state is None:
            raise web.HTTPServiceUnavailable(text="the console has no state yet; retry")
        return web.Response(text=self._last_state, content_type="application/json", headers={"Cache-Control": "no-cache"})

    async def _frame_image(self, request: web.Request) -> web.Response:
        return await self._image_response(request, "frame")

    async def _thumb_image(self, request: web.Request) -> web.Response:
        return await self._image_response(request, "thumb")

    async def _image_response(self, request: web.Request, kind: str) -> web.Response:
        """An image the refresh has encoded (or is encoding); never one more encode for a request."""
        from aiohttp import web

        seq = int(request.match_info["seq"])
        future = self._images.get((seq, kind))
        if future is None:
            raise web.HTTPNotFound(text=f"frame {seq} is not on the console (no longer kept, or not shown yet)")
        data = await future
        return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


__all__ = ["Console", "ConsoleConfig", "MAX_CAMERAS"]
