"""The coil pages' HTTP side: tracking off, bad queries, an unknown coil, the crop of a frame whose
rows run across the strip, and the coil read once per cache period whatever the viewers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from coils.records import DefectRecord
from server.console_coils import CROP_MARGIN_PX, OFF_MESSAGE, frame_crop
from tests.server.coil_line import grey_bands_onnx, make_coil_line
from tests.server.conftest import running_server
from tests.server.test_console_coils_browser import HEIGHT, WIDTH, inspect

aiohttp = pytest.importorskip("aiohttp")


@pytest.fixture(scope="module")
def short_coil(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The grey-bands model and a painted line folder of one 4-frame coil (see tests/server/coil_line.py)."""
    folder = tmp_path_factory.mktemp("short_coil")
    make_coil_line(folder / "line", frames=4, height=HEIGHT, width=WIDTH)
    return grey_bands_onnx(folder / "model.onnx", HEIGHT, WIDTH), folder / "line"


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


def test_bad_queries_and_unknown_coils_are_named_and_reads_are_shared(short_coil, tmp_path) -> None:
    from coils.line import load_line
    from server.console import Console, ConsoleConfig

    coil_model, coil_folder = short_coil
    line = load_line(coil_folder / "line.yaml")

    async def main():
        async with running_server(coil_model, line=line, coil_db=f"sqlite:///{tmp_path / 'coils.db'}") as server:
            coil_id = await asyncio.to_thread(inspect, server.address, coil_folder, range(4))
            tracker, reads = server.coils, []
            get_coil = tracker.get_coil
            tracker.get_coil = lambda c: reads.append(c) or get_coil(c)  # counts the real tracker's reads
            console = Console(server, ConsoleConfig(port=0))
            await console.start()
            base, coil = console.url, quote(coil_id)
            try:
                async with aiohttp.ClientSession() as session:
                    answers = {
                        "limit": await fetch(session, base + "api/coils?limit=0"),
                        "unknown": await fetch(session, base + "api/coil?id=nope"),
                        "no id": await fetch(session, base + "api/coil"),
                        "record": await fetch(session, base + f"api/coil/frames?id={coil}&record=99"),
                        "not its frame": await fetch(session, base + f"coils-crop.jpg?id={coil}&record=0&camera=cam9&frame=6"),
                    }
                    together = await asyncio.gather(*(fetch(session, base + f"api/coil?id={coil}") for _ in range(5)))
            finally:
                await console.stop()
        return coil_id, answers, together, reads

    coil_id, answers, together, reads = asyncio.run(main())
    assert answers["limit"] == (400, "query parameter 'limit' must be an integer in 1..500, got '0'")
    assert answers["unknown"][0] == 404 and "nope" in answers["unknown"][1]
    assert answers["no id"][0] == 400 and "'id'" in answers["no id"][1]
    assert answers["record"] == (404, f"coil {coil_id!r} has no record 99")
    assert answers["not its frame"] == (404, "record 0 does not come from camera 'cam9' frame 6")
    records = together[0][1]["records"]
    assert records and all(status == 200 and body["records"] == records for status, body in together)
    assert reads.count(coil_id) == 1, "five viewers at once: one read of the coil"


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
