"""The console's coil pages: ``/coils`` (the coils, newest first) and ``/coils/<id>`` (one coil's map).

The pages are one static file (``console_static/coils.html``) that reads JSON from:

* ``/api/coils?limit=N&before=T``: the coils' summaries, newest first (the store's ``list_coils``);
* ``/api/coil?id=C``: one coil's summary, records and map (:func:`coils.coilmap.map_svg`, its marks
  carrying their record index); an open coil's records are the store's as they stand, and the page
  polls this while the coil is open;
* ``/api/coil/frames?id=C&record=N``: the frames a record came from, each with the URL of its crop when
  the capture folder (``--capture-dir``) holds that frame, else none (the page says "frame not captured");
* ``/coils-crop.jpg?id=C&record=N&camera=K&frame=F``: the captured frame cut to the record's lane
  band (the record's across extent, a margin either side, the whole frame along: a record says
  where it lies on the coil, not where in each frame, so the band is what can be placed exactly),
  its across edges marked in the class's colour.

The coils are read from the server's coil tracker (``InspectionServer.coils``, ``server serve
--coil-db``: its ``list_coils`` and ``get_coil``), the geometry is the server's line (``--line``);
without them the pages say coil tracking is off. Store reads and crops run on one thread of their own, never on the event loop the
inspection shares, and an answer (a coil, the list) is reused for ``CACHE_S``, so any number of
viewers polling an open coil cost one read per ``CACHE_S``.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from coils.coilmap import map_svg
from coils.line import CameraGeometry, Line
from coils.records import DefectRecord
from engine.metadata import default_class_names
from engine.overlay import class_colour, class_colour_hex
from server.capture_folder import CAPTURES_FILE, CAPTURES_HEADER, IMAGES_DIR

if TYPE_CHECKING:
    from aiohttp import web

    from coils.summary import CoilSummary
    from server.coil_tracker import CoilTracker
    from server.service import InspectionServer

COILS_PAGE = "console_static/coils.html"  # package data of ``server``
OFF_MESSAGE = "coil tracking is off (server serve --coil-db)"
#: Seconds one coil's answer is reused (an open coil's page polls every 2 s).
CACHE_S = 1.0
#: Coils listed per page by default, and at most.
LIST_DEFAULT, LIST_MOST = 50, 500
#: Captures more than this many seconds outside a coil's [opened, last frame] are another coil's frame.
CAPTURE_SLACK_S = 120.0
#: Across pixels kept either side of a record's band in a crop.
CROP_MARGIN_PX = 32
JPEG_QUALITY = 85


def summary_json(summary: CoilSummary) -> dict[str, Any]:
    """What the pages show of a summary (the design's fields, JSON-ready)."""
    return {"coil_id": summary.coil_id, "state": summary.state, "opened_unix_s": summary.opened_unix_s,
            "last_frame_unix_s": summary.last_frame_unix_s, "closed_unix_s": summary.closed_unix_s,
            "close_reason": summary.close_reason, "length_mm": summary.length_mm, "frames": summary.frames,
            "late_frames": summary.late_frames,
            "defects_per_class": {str(k): n for k, n in sorted(summary.defects_per_class.items())},
            "per_100m": {str(k): v for k, v in sorted(summary.per_100m.items())}}


def record_json(index: int, record: DefectRecord) -> dict[str, Any]:
    return {"record": index, "class_id": record.class_id, "along_start_mm": record.along_start_mm,
            "along_end_mm": record.along_end_mm, "across_start_mm": record.across_start_mm,
            "across_end_mm": record.across_end_mm, "area_mm2": record.area_mm2,
            "max_probability": record.max_probability, "cameras": list(record.cameras),
            "frames": [[camera, frame] for camera, frame in record.frames]}


class CapturedFrames:
    """Which frames the capture folder holds, by camera and frame id (read from its ``captures.csv``,
    again only when the file changed)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._stamp: tuple[int, int] | None = None
        self._index: dict[tuple[str, int], list[tuple[float, str]]] = {}

    def find(self, camera_id: str, frame_id: int, opened_s: float, last_s: float) -> Path | None:
        """The captured image of ``camera_id``'s frame ``frame_id`` taken while the coil ran (the one
        nearest in time when a camera's frame ids repeat), or None."""
        if self.directory is None:
            return None
        self._refresh()
        best: tuple[float, str] | None = None
        for captured_s, image_id in self._index.get((camera_id, int(frame_id)), []):
            distance = max(opened_s - captured_s, captured_s - last_s, 0.0)
            if distance <= CAPTURE_SLACK_S and (best is None or distance < best[0]):
                best = (distance, image_id)
        if best is None:
            return None
        path = self.directory / IMAGES_DIR / best[1]
        return path if path.is_file() else None

    def _refresh(self) -> None:
        assert self.directory is not None
        path = self.directory / CAPTURES_FILE
        try:
            status = path.stat()
        except OSError:
            self._stamp, self._index = None, {}
            return
        stamp = (status.st_size, status.st_mtime_ns)
        if stamp == self._stamp:
            return
        index: dict[tuple[str, int], list[tuple[float, str]]] = {}
        with path.open(newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None or tuple(header) != CAPTURES_HEADER:
                raise ValueError(f"{path}: not a capture folder's {CAPTURES_FILE} (header {header})")
            for row in rows:
                if len(row) == len(CAPTURES_HEADER) and row[2].lstrip("-").isdigit() and row[3].isdigit():
                    index.setdefault((row[1], int(row[2])), []).append((int(row[3]) / 1e9, row[0]))
        self._stamp, self._index = stamp, index


def frame_crop(image: np.ndarray, camera: CameraGeometry, record: DefectRecord) -> np.ndarray:
    """The frame cut to the record's across band (with a margin), its edges marked in the class colour.

    Raises:
        ValueError: the image is not the camera's frame size.
    """
    picture = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if picture.shape[:2] != (camera.frame_height_px, camera.frame_width_px):
        raise ValueError(f"captured frame of camera {camera.camera_id!r} is {picture.shape[1]}x{picture.shape[0]}, "
                         f"the line says {camera.frame_width_px}x{camera.frame_height_px}")
    grid = picture if camera.along_axis == "y" else picture.transpose(1, 0, 2)
    px = camera.mm_per_px_across
    first = max(0, min(camera.pixels_across, math.floor((record.across_start_mm - camera.lane_start_mm) / px)))
    last = max(first + 1, min(camera.pixels_across, math.ceil((record.across_end_mm - camera.lane_start_mm) / px)))
    left, right = max(0, first - CROP_MARGIN_PX), min(camera.pixels_across, last + CROP_MARGIN_PX)
    crop = np.ascontiguousarray(grid[:, left:right])
    colour = class_colour(record.class_id - 1)
    for column in (first - left - 1, last - left):
        if 0 <= column < crop.shape[1]:
            crop[:, column] = colour
    return crop if camera.along_axis == "y" else np.ascontiguousarray(crop.transpose(1, 0, 2))


@dataclass
class _Cached:
    at: float  # time.monotonic()
    answer: asyncio.Future[tuple[CoilSummary, list[DefectRecord], str]]


class CoilPages:
    """The coil pages of one console: routes, store reads on their own thread, the capture index.

    Example::

        pages = CoilPages(server)
        app.add_routes(pages.routes())
        ...
        pages.close()
    """

    def __init__(self, server: InspectionServer) -> None:
        self.server = server
        capture = server.config.capture
        self.captured = CapturedFrames(Path(capture.directory) if capture is not None else None)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="console-coils")
        self._answers: dict[tuple[Any, ...], _Cached] = {}

    @property
    def store(self) -> CoilTracker | None:
        """The server's coil reader (``list_coils``, ``get_coil``): its coil tracker, None without ``--coil-db``
        (and until the model has loaded)."""
        return self.server.coils

    @property
    def line(self) -> Line | None:
        return self.server.config.line

    def routes(self) -> list[web.RouteDef]:
        from aiohttp import web

        return [web.get("/coils", self._page), web.get(r"/coils/{coil_id:.+}", self._page),
                web.get("/api/coils", self._list), web.get("/api/coil", self._coil),
                web.get("/api/coil/frames", self._frames), web.get("/coils-crop.jpg", self._crop)]

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)

    async def _run(self, work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._reader, work)

    def _class_names(self) -> list[str] | None:
        backend = self.server.backend
        return list(backend.metadata.class_names) if backend is not None else None

    def _classes(self, seen: set[int]) -> list[dict[str, Any]]:
        """Name and colour of the model's classes (the default names before it is loaded) and of ``seen``."""
        names = self._class_names() or list(default_class_names(max(seen | {4})))
        ids = sorted(seen | set(range(1, len(names) + 1)))
        return [{"id": k, "name": names[k - 1] if k <= len(names) else f"class {k}", "colour": class_colour_hex(k - 1)}
                for k in ids]

    # ------------------------------------------------------------------ HTTP

    async def _page(self, request: web.Request) -> web.Response:
        from aiohttp import web

        page = resources.files("server").joinpath(COILS_PAGE).read_text(encoding="utf-8")
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def _list(self, request: web.Request) -> web.Response:
        store = self.store
        if store is None or self.line is None:
            return _json({"tracking": False, "message": OFF_MESSAGE, "coils": []})
        limit = _int_arg(request, "limit", LIST_DEFAULT, 1, LIST_MOST)
        before = _float_arg(request, "before")
        coils = await self._shared(("list", limit, before), lambda: store.list_coils(limit, before))
        seen = {k for s in coils for k in s.defects_per_class}
        return _json({"tracking": True, "classes": self._classes(seen), "coils": [summary_json(s) for s in coils]})

    async def _coil(self, request: web.Request) -> web.Response:
        coil_id = _str_arg(request, "id")
        if self.store is None or self.line is None:
            return _json({"tracking": False, "message": OFF_MESSAGE})
        summary, records, svg = await self._read(coil_id)
        classes = self._classes({r.class_id for r in records})
        return _json({"tracking": True, "summary": summary_json(summary), "classes": classes, "map": svg,
                      "records": [record_json(i, r) for i, r in enumerate(records)]})

    async def _frames(self, request: web.Request) -> web.Response:
        from urllib.parse import urlencode

        coil_id = _str_arg(request, "id")
        summary, record = await self._record(request, coil_id)
        found = await self._run(lambda: [self.captured.find(c, f, summary.opened_unix_s, summary.last_frame_unix_s)
                                         for c, f in record.frames])
        index = int(request.query["record"])
        frames = [{"camera_id": c, "frame_id": f,
                   "image": None if path is None else
                   "/coils-crop.jpg?" + urlencode({"id": coil_id, "record": index, "camera": c, "frame": f})}
                  for (c, f), path in zip(record.frames, found)]
        return _json({"record": index, "frames": frames, "capture": self.captured.directory is not None})

    async def _crop(self, request: web.Request) -> web.Response:
        from aiohttp import web

        summary, record = await self._record(request, _str_arg(request, "id"))
        camera_id, frame_id = _str_arg(request, "camera"), _int_arg(request, "frame", None, 0, 2**63 - 1)
        if (camera_id, frame_id) not in record.frames:
            raise web.HTTPNotFound(text=f"record {request.query['record']} does not come from camera "
                                        f"{camera_id!r} frame {frame_id}")
        assert self.line is not None
        camera = self.line.camera(camera_id)

        def cut() -> bytes | None:
            path = self.captured.find(camera_id, frame_id, summary.opened_unix_s, summary.last_frame_unix_s)
            image = None if path is None else cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                return None
            ok, data = cv2.imencode(".jpg", frame_crop(image, camera, record), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            return data.tobytes() if ok else None

        data = await self._run(cut)
        if data is None:
            raise web.HTTPNotFound(text="frame not captured")
        return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    # ------------------------------------------------------------------ reads

    async def _record(self, request: web.Request, coil_id: str) -> tuple[CoilSummary, DefectRecord]:
        from aiohttp import web

        if self.store is None or self.line is None:
            raise web.HTTPNotFound(text=OFF_MESSAGE)
        summary, records, _ = await self._read(coil_id)
        index = _int_arg(request, "record", None, 0, 2**31)
        if index >= len(records):
            raise web.HTTPNotFound(text=f"coil {coil_id!r} has no record {index}")
        return summary, records[index]

    async def _read(self, coil_id: str) -> tuple[CoilSummary, list[DefectRecord], str]:
        """The coil's summary, records and map."""
        store, line, names = self.store, self.line, self._class_names()

        def read() -> tuple[CoilSummary, list[DefectRecord], str]:
            summary, records = store.get_coil(coil_id)
            from coils.alarm_store import AlarmStore

            periodic = store.store.verdict(summary, records).periodic
            alarms = AlarmStore(store.store).for_coil(coil_id)
            return summary, records, map_svg(line, summary, records, class_names=names, periodic=periodic,
                                             alarms=alarms)

        return await self._shared(("coil", coil_id), read)

    async def _shared(self, key: tuple[Any, ...], work: Callable[[], Any]) -> Any:
        """``work()`` on the reader thread, its answer shared by every request for ``key`` for ``CACHE_S``:
        one store read per ``CACHE_S`` whatever the number of viewers."""
        now = time.monotonic()
        cached = self._answers.get(key)
        if cached is None or now - cached.at > CACHE_S or _failed(cached.answer):
            for old in [k for k, c in self._answers.items() if now - c.at > CACHE_S]:
                del self._answers[old]
            cached = self._answers[key] = _Cached(now, asyncio.ensure_future(self._run(work)))
        return await self._guarded(lambda: cached.answer)

    async def _guarded(self, work: Callable[[], Any]) -> Any:
        """Runs a store read (a callable, or the future one returns), mapping its failures to HTTP:
        an unknown coil 404, a store that cannot be reached 503."""
        from aiohttp import web

        from coils.store import StoreUnavailable  # here: a store exists, so SQLAlchemy is installed

        try:
            result = work()
            # shield: a viewer that goes away must not cancel the read the others share
            return await (asyncio.shield(result) if asyncio.isfuture(result) else self._run(work))
        except KeyError as exc:
            raise web.HTTPNotFound(text=f"no coil {exc.args[0] if exc.args else ''}") from None
        except StoreUnavailable as exc:
            raise web.HTTPServiceUnavailable(text=f"the coil database cannot be read: {exc}") from None


def _failed(answer: asyncio.Future[Any]) -> bool:
    return answer.done() and (answer.cancelled() or answer.exception() is not None)


def _json(payload: dict[str, Any]) -> web.Response:
    from aiohttp import web

    return web.Response(text=json.dumps(payload), content_type="application/json", headers={"Cache-Control": "no-cache"})


def _str_arg(request: web.Request, name: str) -> str:
    from aiohttp import web

    value = request.query.get(name, "")
    if not value or len(value) > 1024:
        raise web.HTTPBadRequest(text=f"query parameter {name!r} is missing or longer than 1024 characters")
    return value


def _int_arg(request: web.Request, name: str, default: int | None, low: int, high: int) -> int:
    from aiohttp import web

    text = request.query.get(name)
    if text is None and default is not None:
        return default
    if text is None or not text.isdigit() or len(text) > 19 or not low <= int(text) <= high:
        raise web.HTTPBadRequest(text=f"query parameter {name!r} must be an integer in {low}..{high}, got {text!r}")
    return int(text)


def _float_arg(request: web.Request, name: str) -> float | None:
    from aiohttp import web

    text = request.query.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise web.HTTPBadRequest(text=f"query parameter {name!r} must be a number, got {text[:40]!r}")
    return value


__all__ = ["CACHE_S", "OFF_MESSAGE", "CapturedFrames", "CoilPages", "frame_crop", "record_json", "summary_json"]
