"""The coil pages' HTTP side: tracking off, bad queries, an unknown coil, the crop of a frame whose
rows run across the strip, and the coil read once per cache period whatever the viewers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from coils.records import DefectRecord
from server.console_coils import CROP_MARGIN_PX, OFF_MESSAGE, frame_crop
from tests.server.conftest import running_server
from tests.server.test_console_coils_browser import COIL, coil_line, write_coil

aiohttp = pytest.importorskip("aiohttp")


async def fetch(session, url: str) -> tuple[int, object]:
    async with session.get(url) as response:
        body = await (response.json() if response.content_type == "application/json" else response.text())
        return response.status, body


def test_without_a_coil_store_the_pages_say_tracking_is_off(tiny_onnx) -> None:
    from server.console import Console, ConsoleConfig

    async def main():
        async with running_server(tiny_onnx) as server:
            console = Console(server, ConsoleConfig(port=0))
            await console.start()
            try:
                async with aiohttp.ClientSession() as session:
                    listed = await fetch(session, console.url + "api/coils")
                    coil = await fetch(session, console.url + "api/coil?id=C1")
                    page = await fetch(session, console.url + "coils/C1")
            finally:
                await console.stop()
        return listed, coil, page

    listed, coil, page = asyncio.run(main())
    assert listed == (200, {"tracking": False, "message": OFF_MESSAGE, "coils": []})
    assert coil == (200, {"tracking": False, "message": OFF_MESSAGE})
    assert page[0] == 200 and "<title>Coils" in page[1]


def test_bad_queries_and_unknown_coils_are_named_and_reads_are_shared(tiny_onnx, tmp_path) -> None:
    from coils.store import CoilStore
    from server.console import Console, ConsoleConfig

    line = coil_line()
    store = CoilStore.open(f"sqlite:///{tmp_path / 'coils.db'}", line)
    write_coil(store, line)
    reads = []
    get_coil = store.get_coil
    store.get_coil = lambda coil_id: reads.append(coil_id) or get_coil(coil_id)  # counts the real store's reads

    async def main():
        async with running_server(tiny_onnx, line=line) as server:
            server.coil_store = store
            console = Console(server, ConsoleConfig(port=0))
            await console.start()
            base = console.url
            try:
                async with aiohttp.ClientSession() as session:
                    answers = {
                        "limit": await fetch(session, base + "api/coils?limit=0"),
                        "unknown": await fetch(session, base + "api/coil?id=nope"),
                        "no id": await fetch(session, base + "api/coil"),
                        "record": await fetch(session, base + f"api/coil/frames?id={COIL}&record=7"),
                        "not its frame": await fetch(session, base + f"coils-crop.jpg?id={COIL}&record=0&camera=cam1&frame=6"),
                    }
                    together = await asyncio.gather(*(fetch(session, base + f"api/coil?id={COIL}") for _ in range(5)))
            finally:
                await console.stop()
        return answers, together

    answers, together = asyncio.run(main())
    store.close()
    assert answers["limit"] == (400, "query parameter 'limit' must be an integer in 1..500, got '0'")
    assert answers["unknown"][0] == 404 and "nope" in answers["unknown"][1]
    assert answers["no id"][0] == 400 and "'id'" in answers["no id"][1]
    assert answers["record"] == (404, f"coil {COIL!r} has no record 7")
    assert answers["not its frame"] == (404, "record 0 does not come from camera 'cam1' frame 6")
    assert all(status == 200 and len(body["records"]) == 2 for status, body in together)
    assert reads.count(COIL) == 1, "five viewers at once: one store read"


def test_a_crop_keeps_the_records_band_in_the_cameras_orientation() -> None:
    from coils.line import Line

    camera = {"camera_id": "cam0", "lane_start_mm": 100.0, "mm_per_px_across": 2.0, "mm_per_px_along": 1.0,
              "along_axis": "x", "frame_width_px": 50, "frame_height_px": 200}  # rows run across the strip
    line = Line.from_dict({"name": "x", "strip_width_mm": 500, "cameras": [camera]})
    image = np.arange(200 * 50, dtype=np.uint32).reshape(200, 50).astype(np.uint8)
    record = DefectRecord("C", 2, 10.0, 20.0, 200.0, 240.0, 400.0, None, (("cam0", 0),), ("cam0",))
    crop = frame_crop(image, line.camera("cam0"), record)
    first, last = 50, 70  # across pixels (200 - 100) / 2 .. (240 - 100) / 2: image rows
    assert crop.shape == (last - first + 2 * CROP_MARGIN_PX, 50, 3)
    assert (crop[CROP_MARGIN_PX + 1, :, 0] == image[first + 1]).all()  # the band's rows, every column
    assert (crop[CROP_MARGIN_PX - 1] == (255, 128, 0)).all() and (crop[CROP_MARGIN_PX + last - first] == (255, 128, 0)).all()
    with pytest.raises(ValueError, match="captured frame of camera 'cam0' is 40x200, the line says 50x200"):
        frame_crop(np.zeros((200, 40), np.uint8), line.camera("cam0"), record)
