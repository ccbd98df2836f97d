"""The line operator's live console: one web page per server (``server serve --console-port N``).

Per camera the page shows the latest frame with its predicted masks drawn over it (the one drawing,
:func:`engine.overlay.draw_prediction` at display size), the last defective frames as thumbnails, the defect rate per
class over the last minutes, and the server's load, errors, drift, capture counters and model.

How it stays off the inspection's hot path:

* :meth:`Console.observe` is the server's batch listener (``InspectionServer.batch_listeners``):
  called on the event loop once a batch's frames are answered, it stores references per camera
  (the batch's frame row, its RLE strings, counts and decisions) in a dict and a bounded deque,
  and adds the decisions to the per-camera rate buckets. No drawing, no encoding, no copies but
  the frame of a defective one (kept for its thumbnail, so the deque does not pin whole batches).
* A background task wakes ``refresh_hz`` times a second, and does nothing while no viewer is
  connected. With viewers it draws and JPEG-encodes, on its own thread, only the frames the page
  will show (each camera's latest, new thumbnails), each ONCE: images are cached by frame sequence
  number and every viewer fetches the same bytes. It then pushes one JSON state to every viewer
  over server-sent events.

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
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.console_state import camera_state, latency_buckets, server_state

if TYPE_CHECKING:
    from aiohttp import web

    from server.batcher import FinishedBatch
    from server.service import InspectionServer

log = logging.getLogger(__name__)

STATIC_PAGE = "console_static/index.html"  # package data of ``server``
#: Cameras the console keeps; frames of further cameras are counted and not shown.
MAX_CAMERAS = 64
#: Seconds of load history behind frames/s and p95 latency.
LOAD_WINDOW_S = 10.0
#: Frames of one camera observed within this many seconds are ordered by frame id.
REORDER_S = 1.0
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


@dataclass(eq=False)
class _Shot:
    """One inspected frame as the console keeps it: references, no encoding."""

    seq: int
    camera_id: str
    frame_id: int
    time: float  # time.time()
    frame: np.ndarray  # uint8 [H, W]: a row of the batch (latest) or a copy (thumbnails)
    rles: list[str]
    counts: np.ndarray  # int [C]
    present: np.ndarray  # bool [C]


def _lowest_priority() -> None:
    """Runs the encoder thread at the lowest CPU priority (Linux: a thread's own nice value), so a
    busy CPU serves inference first and the console's pictures wait."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed
        log.debug("console encoder keeps its priority: %s", exc)


def _newer(shot: _Shot, other: _Shot) -> bool:
    """Whether ``shot`` is a later frame of its camera than ``other``.

    Batches finish in any order (their RLE runs in a pool), so a frame observed later may be an
    earlier one: by frame id, unless ``other`` was observed over REORDER_S before (the camera
    restarted its numbering)."""
    return shot.frame_id > other.frame_id or shot.time - other.time >= REORDER_S


def _keep(kept: list[_Shot], shot: _Shot, limit: int) -> None:
    """Inserts ``shot`` into ``kept`` (oldest first) in frame order, keeping the newest ``limit``."""
    i = len(kept)
    while i > 0 and not _newer(shot, kept[i - 1]):
        i -= 1
    kept.insert(i, shot)
    if len(kept) > limit:
        del kept[0]


@dataclass(eq=False)
class _Camera:
    camera_id: str
    num_classes: int
    latest: _Shot | None = None
    shown: _Shot | None = None  # the latest frame whose image is ready: what the page shows
    shown_at: float = 0.0  # time.monotonic() it was shown
    defective: list[_Shot] = field(default_factory=list)  # the last defective frames, oldest first
    frames: int = 0
    defective_frames: np.ndarray = field(default=None)  # type: ignore[assignment]  # int64 [C]
    buckets: deque[list[Any]] = field(default_factory=deque)  # [bucket start, frames, defects [C]]

    def __post_init__(self) -> None:
        self.defective_frames = np.zeros(self.num_classes, np.int64)


class Console:
    """The console of one :class:`InspectionServer`.

    Example::

        console = Console(server, ConsoleConfig(port=8080))
        await console.start()          # after server.start(); registers the batch listener
        ...                            # http://127.0.0.1:8080/
        await console.stop()
    """

    def __init__(self, server: InspectionServer, config: ConsoleConfig | None = None) -> None:
        self.server = server
        self.config = config or ConsoleConfig()
        self.port: int | None = None
        self._cameras: dict[str, _Camera] = {}
        self._seq = 0
        self._ignored_frames = 0
        self._viewers: set[asyncio.Queue[str | None]] = set()
        self._images: dict[tuple[int, str], asyncio.Future[bytes]] = {}
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="console-encode", initializer=_lowest_priority)
        self._load: deque[tuple[float, int, dict[str, int], np.ndarray]] = deque()
        self._last_state: str | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._runner: Any = None
        self.encoded = 0  # images encoded, over all viewers (each at most once)
        self.updates = 0  # states pushed (one per tick with viewers)

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert is not None else "http"
        return f"{scheme}://{self.config.bind}:{self.port}/"

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    # ------------------------------------------------------------------ hot path

    def observe(self, batch: FinishedBatch) -> None:
        """Keeps references to a finished batch's frames; the server's batch listener (O(1) per frame)."""
        now = time.time()
        present = batch.result.present
        counts = batch.result.counts
        flagged = present.any(axis=1)
        for i, camera_id in enumerate(batch.camera_ids):
            camera = self._cameras.get(camera_id)
            if camera is None:
                camera = self._add_camera(camera_id, present.shape[1])
                if camera is None:
                    continue
            self._seq += 1
            shot = _Shot(self._seq, camera_id, int(getattr(batch.sources[i], "frame_id", -1)), now, batch.frames[i],
                         batch.rles[i], counts[i], present[i])
            if camera.latest is None or _newer(shot, camera.latest):
                camera.latest = shot
            camera.frames += 1
            bucket = self._bucket(camera, now)
            bucket[1] += 1
            if flagged[i]:
                bucket[2] += present[i]
                camera.defective_frames += present[i]
                if self.config.thumbnails:
                    # A copy: a kept thumbnail must not pin its whole batch.
                    _keep(camera.defective, _Shot(shot.seq, camera_id, shot.frame_id, now, batch.frames[i].copy(),
                                                  shot.rles, shot.counts, shot.present), self.config.thumbnails)

    def _add_camera(self, camera_id: str, num_classes: int) -> _Camera | None:
        if len(self._cameras) >= MAX_CAMERAS:
            if self._ignored_frames == 0:
                log.warning("event=console_cameras_full cameras=%d camera=%r: further cameras are not shown",
                            MAX_CAMERAS, camera_id)
            self._ignored_frames += 1
            return None
        camera = _Camera(camera_id, num_classes)
        self._cameras[camera_id] = camera
        return camera

    def _bucket(self, camera: _Camera, now: float) -> list[Any]:
        start = now - now % self.config.bucket_s
        if not camera.buckets or camera.buckets[-1][0] != start:
            camera.buckets.append([start, 0, np.zeros(camera.num_classes, np.int64)])
            while camera.buckets[0][0] < now - self.config.history_s:
                camera.buckets.popleft()
        return camera.buckets[-1]

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
        app = web.Application()
        app.add_routes([
            web.get("/", self._index),
            web.get("/events", self._events),
            web.get("/api/state", self._state_json),
            web.get(r"/frames/{seq:\d+}.jpg", self._frame_image),
            web.get(r"/thumbs/{seq:\d+}.jpg", self._thumb_image),
        ])
        ssl_context = self._ssl_context()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.bind, cfg.port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"console cannot listen on {cfg.bind}:{cfg.port}: {exc}") from None
        self.port = int(self._runner.addresses[0][1])
        self.server.batch_listeners.append(self.observe)
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_loop())
        log.info("event=console_start url=%s refresh_hz=%g", self.url, cfg.refresh_hz)
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
        """Ends every viewer's event stream, then the web server and the encoder thread."""
        if self.observe in self.server.batch_listeners:
            self.server.batch_listeners.remove(self.observe)
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        for queue in list(self._viewers):
            queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.get_running_loop().run_in_executor(None, self._encoder.shutdown, True)
        log.info("event=console_stop encoded=%d updates=%d", self.encoded, self.updates)

    # ------------------------------------------------------------------ refresh

    async def _refresh_loop(self) -> None:
        period = 1.0 / self.config.refresh_hz
        while True:
            await asyncio.sleep(period)
            if not self._viewers:
                continue
            try:
                state = await self.state()
            except Exception:  # noqa: BLE001 - the console must never take the server down
                log.exception("event=console_refresh_error")
                continue
            self._last_state = json.dumps(state)
            self.updates += 1
            for queue in self._viewers:
                if queue.full():  # a slow viewer gets the newest state, not a backlog
                    queue.get_nowait()
                queue.put_nowait(self._last_state)

    async def state(self) -> dict[str, Any]:
        """What the page shows, as JSON-ready data: frames and thumbnails whose images are ready."""
        self._sample_load()
        await self._encode_some()
        cameras = [
            camera_state(camera, [s for s in camera.defective if self._ready(s, "thumb")], self.config.bucket_s,
                         self.config.history_s, self._load)
            for camera in self._cameras.values()
        ]
        return {"time": time.time(), **server_state(self.server, self._load), "cameras": cameras,
                "ignored_frames": self._ignored_frames}

    async def _encode_some(self) -> None:
        """Encodes the images the page lacks, at most the tick's budget: cameras' latest frames
        first (the one refreshed longest ago first), then new thumbnails. A camera keeps showing
        its previous frame until its turn comes."""
        wanted = []
        for camera in self._cameras.values():
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
            elif kind == "frame" and (camera.shown is None or _newer(shot, camera.shown)):
                camera.shown, camera.shown_at = shot, now
        self._forget_images()

    def _ready(self, shot: _Shot, kind: str) -> bool:
        future = self._images.get((shot.seq, kind))
        return future is not None and future.done() and future.exception() is None

    def _sample_load(self) -> None:
        """One sample of the counters behind frames/s and p95 latency (kept for LOAD_WINDOW_S)."""
        now = time.monotonic()
        frames = {camera_id: camera.frames for camera_id, camera in self._cameras.items()}
        self._load.append((now, self.server.stats()["answered"], frames, latency_buckets(self.server.metrics)))
        while len(self._load) > 2 and self._load[1][0] <= now - LOAD_WINDOW_S:
            self._load.popleft()

    # ------------------------------------------------------------------ images

    def _retained(self) -> Iterable[_Shot]:
        for camera in self._cameras.values():
            yield from (s for s in (camera.latest, camera.shown) if s is not None)
            yield from camera.defective

    def _find(self, seq: int) -> _Shot | None:
        return next((s for s in self._retained() if s.seq == seq), None)

    def _image(self, shot: _Shot, kind: str) -> asyncio.Future[bytes]:
        """The JPEG of a shot (``frame``: display size, ``thumb``: thumbnail), encoded at most once."""
        key = (shot.seq, kind)
        future = self._images.get(key)
        if future is None:
            width = self.config.display_width if kind == "frame" else self.config.thumbnail_width
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._encoder, self._encode, shot, width)
            self._images[key] = future
        return future

    def _encode(self, shot: _Shot, width: int) -> bytes:
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
        keep = {s.seq for s in self._retained()}
        for key in [k for k in self._images if k[0] not in keep]:
            del self._images[key]

    # ------------------------------------------------------------------ HTTP

    async def _index(self, request: web.Request) -> web.Response:
        from aiohttp import web

        page = resources.files("server").joinpath(STATIC_PAGE).read_text(encoding="utf-8")
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one ``data:`` line of JSON state per refresh while connected."""
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=1)
        self._viewers.add(queue)
        log.info("event=console_viewer_open viewers=%d peer=%s", len(self._viewers), request.remote)
        try:
            await response.write(b"retry: 2000\n\n")
            if self._last_state is not None:
                await response.write(f"data: {self._last_state}\n\n".encode())
            while (message := await queue.get()) is not None:
                await response.write(f"data: {message}\n\n".encode())
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self._viewers.discard(queue)
            log.info("event=console_viewer_close viewers=%d", len(self._viewers))
        return response

    async def _state_json(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.json_response(await self.state())

    async def _frame_image(self, request: web.Request) -> web.Response:
        return await self._image_response(request, "frame")

    async def _thumb_image(self, request: web.Request) -> web.Response:
        return await self._image_response(request, "thumb")

    async def _image_response(self, request: web.Request, kind: str) -> web.Response:
        from aiohttp import web

        seq = int(request.match_info["seq"])
        future = self._images.get((seq, kind))
        if future is None:
            shot = self._find(seq)
            if shot is None:
                raise web.HTTPNotFound(text=f"frame {seq} is no longer kept by the console")
            future = self._image(shot, kind)
        data = await future
        return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


__all__ = ["Console", "ConsoleConfig", "MAX_CAMERAS"]
