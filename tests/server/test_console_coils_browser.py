"""The console's coil pages in headless Chromium, on a real server tracking a real coil.

A simulated coil (``trainer synth-line``, repainted so that the grey-bands inspection graph finds the
planted defects pixel for pixel) goes through two real servers sharing one SQLite coil database,
as replicas behind a balancer would: the first (with the console, capturing defective frames)
inspects the coil's first frames, the second (no capture) the next ones. ``/coils`` lists the coil;
``/coils/<id>`` shows one mark per record; a click on a defect from a captured frame shows that
frame's crop (the defect's grey level inside it), a click on one from the other replica's frames
says "frame not captured"; the coil's last frames arriving while the page is open show up on it,
and so does its close. A screenshot is saved (to ``$COILS_SCREENSHOT`` when set:
``docs/console-coils.png`` is taken this way).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from server.console_coils import CROP_MARGIN_PX
from tests.server.coil_line import GREY, grey_bands_onnx, make_coil_line
from tests.server.conftest import ServerThread
from tests.server.test_console_browser import (
    browser_missing_reason,
    chromium,
    start_console,
    stop_console,
    wait_for,
)

pytestmark = pytest.mark.skipif(browser_missing_reason() is not None, reason=str(browser_missing_reason()))

HEIGHT, WIDTH, FRAMES = 32, 128, 24
FIRST, SECOND = range(0, 12), range(12, 20)  # frames inspected by the capturing server, then by the other one


@pytest.fixture(scope="module")
def coil_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return grey_bands_onnx(tmp_path_factory.mktemp("grey_bands") / "model.onnx", HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def coil_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("coil") / "line"
    make_coil_line(folder, frames=FRAMES, height=HEIGHT, width=WIDTH, seed=5)
    return folder


def inspect(address: str, folder: Path, frames: range) -> str:
    """Sends both cameras' frames ``frames`` (per-camera frame index) with their coil and position;
    returns the coil id."""
    import grpc

    from client.stream_folder import line_shots, make_request
    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

    shots = line_shots(folder)
    requests = [make_request(camera_id, s.frame_id, s.path, False, s.coil_id, s.position_mm)
                for camera_id, listed in shots.items() for k, s in enumerate(listed) if k in frames]

    async def send() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            answers = [a async for a in pb_grpc.InspectionServiceStub(channel).Inspect(iter(requests))]
        assert len(answers) == len(requests) and not any(a.HasField("error") for a in answers)

    asyncio.run(send())
    return next(iter(shots.values()))[0].coil_id


PAGE_JS = """
const state = document.getElementById("state");
return {
  marks: [...document.querySelectorAll("#map .defect")].map((m) => Number(m.dataset.record)).sort((a, b) => a - b),
  rows: document.querySelectorAll("#records tbody tr").length,
  state: state ? state.textContent : "",
  crops: [...document.querySelectorAll("#defect figure.crop")].map((f) => {
    const img = f.querySelector("img"), missing = f.querySelector(".not-captured");
    return {camera: f.dataset.camera, frame: Number(f.dataset.frame),
            src: img && img.complete && img.naturalWidth > 0 ? img.src : null, text: missing ? missing.textContent : null};
  }),
};
"""


def shown(driver, predicate):
    """What the coil page shows (read in one script), when ``predicate`` holds for it; else False."""
    page = driver.execute_script(PAGE_JS)
    return page if predicate(page) else False


def click_mark(driver, record: int) -> None:
    """A real mouse click at the centre of the map's mark of ``record`` (an SVG line's box has no height,
    which WebDriver's element click refuses as not interactable; the pointer hits its stroke)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    mark = driver.find_element(By.CSS_SELECTOR, f'#map .defect[data-record="{record}"]')
    ActionChains(driver).move_to_element(mark).click().perform()


def wait_for_captures(folder: Path, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        images = folder / "train_images"
        if images.is_dir() and len([p for p in images.iterdir() if not p.name.startswith(".")]) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not capture {count} frames into {folder}")


def end_coil(address: str, coil_id: str) -> None:
    import grpc

    from protos.inspection.v1 import inspection_pb2 as pb
    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

    async def end() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            await pb_grpc.InspectionServiceStub(channel).EndCoil(pb.EndCoilRequest(coil_id=coil_id))

    asyncio.run(end())


def records_of(server, coil_id: str) -> list:
    return server.coils.get_coil(coil_id)[1]


def only_from(records, frames: range, per_camera: dict[str, list[int]]) -> int:
    """The first record all of whose frames are among ``frames`` (per-camera frame indices)."""
    for index, record in enumerate(records):
        if all(per_camera[c].index(f) in frames for c, f in record.frames):
            return index
    raise AssertionError(f"no record comes from frames {frames} only")


def test_the_coil_pages_list_map_and_follow_the_coil(coil_model, coil_folder, tmp_path: Path) -> None:
    from client.stream_folder import line_shots
    from coils.line import load_line
    from server.capture import CaptureConfig, CapturePolicy

    line, database = load_line(coil_folder / "line.yaml"), f"sqlite:///{tmp_path / 'coils.db'}"
    per_camera = {c: [s.frame_id for s in listed] for c, listed in line_shots(coil_folder).items()}
    capture = CaptureConfig(tmp_path / "captures", policy=CapturePolicy.parse("defects"))
    first = ServerThread(coil_model, line=line, coil_db=database, capture=capture)
    second = ServerThread(coil_model, line=line, coil_db=database, coil_spool=tmp_path / "spool-2")
    with first as server, tempfile.TemporaryDirectory() as profile:
        with second as replica:
            coil_id = inspect(server.address, coil_folder, FIRST)
            inspect(replica.address, coil_folder, SECOND)
        records = records_of(server, coil_id)
        captured_index = only_from(records, FIRST, per_camera)
        missing_index = only_from(records, SECOND, per_camera)
        from_first = {(c, f) for r in records for c, f in r.frames if per_camera[c].index(f) in FIRST}
        wait_for_captures(tmp_path / "captures", len(from_first))
        console, driver = None, chromium(Path(profile))
        try:
            console = start_console(thread=first, refresh_hz=4)
            seen = walk_the_pages(driver, console.url, len(records), captured_index, missing_index,
                                  lambda: inspect(server.address, coil_folder, range(SECOND.stop, FRAMES)),
                                  lambda: len(records_of(server, coil_id)), lambda: end_coil(server.address, coil_id))
        finally:
            driver.quit()
            if console is not None:
                stop_console(first, console)
    assert seen["listed"] == [coil_id, "open", str(len(records))]
    assert seen["page"]["marks"] == list(range(len(records))) and seen["page"]["rows"] == len(records)
    assert seen["page"]["state"] == "open (updates live)"
    record = records[captured_index]
    assert [(c["camera"], c["frame"]) for c in seen["captured"]] == list(record.frames)
    camera = line.camera(record.frames[0][0])
    first_px = int((record.across_start_mm - camera.lane_start_mm) // camera.mm_per_px_across)
    last_px = int(-(-(record.across_end_mm - camera.lane_start_mm) // camera.mm_per_px_across))
    band = min(camera.pixels_across, last_px + CROP_MARGIN_PX) - max(0, first_px - CROP_MARGIN_PX)
    crop = seen["crop"]
    assert crop.shape == (HEIGHT, band), "the record's band with its margins, every row of the frame"
    assert (np.abs(crop.astype(int) - GREY[record.class_id]) <= 12).sum() >= 2, "the defect's own grey is in the crop"
    assert {c["text"] for c in seen["missing"]} == {"frame not captured"}
    assert [(c["camera"], c["frame"]) for c in seen["missing"]] == list(records[missing_index].frames)
    assert seen["all_records"] > len(records) and seen["live"]["rows"] == seen["all_records"]
    assert seen["closed"]["state"].startswith("closed (end)")


def walk_the_pages(driver, url: str, records: int, captured_index: int, missing_index: int, last_frames,
                   count_records, close) -> dict:
    """Opens ``/coils``, follows the coil's link, clicks a captured and a not captured defect, sends the
    coil's last frames (``last_frames()``) and closes it (``close()``); returns what the pages showed."""
    from selenium.webdriver.common.by import By

    seen: dict = {}
    driver.get(url + "coils")
    link = wait_for(driver, lambda: driver.find_element(By.CSS_SELECTOR, "#coils tbody tr a"), 30, "the coil")
    seen["listed"] = [driver.find_element(By.CSS_SELECTOR, f"#coils tbody tr td{c}").text
                      for c in ("", ".coil-state", ".defects")]
    link.click()
    seen["page"] = wait_for(driver, lambda: shown(driver, lambda p: len(p["marks"]) == records), 30, "the marks")
    click_mark(driver, captured_index)
    seen["captured"] = wait_for(driver, lambda: shown(driver, lambda p: p["crops"] and all(c["src"] for c in p["crops"])),
                                30, "the captured frames' crops")["crops"]
    jpeg = urllib.request.urlopen(seen["captured"][0]["src"]).read()
    seen["crop"] = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    click_mark(driver, missing_index)
    seen["missing"] = wait_for(driver, lambda: shown(driver, lambda p: p["crops"] and p["crops"][0]["text"]), 30,
                               "the other replica's frames")["crops"]
    last_frames()  # the coil's last frames arrive while the page is open
    seen["all_records"] = count_records()
    seen["live"] = wait_for(driver, lambda: shown(driver, lambda p: len(p["marks"]) == seen["all_records"]), 30,
                            "the last frames' defects")
    if os.environ.get("COILS_SCREENSHOT"):
        click_mark(driver, captured_index)
        wait_for(driver, lambda: shown(driver, lambda p: p["crops"] and p["crops"][0]["src"]), 30, "a crop")
        driver.set_window_size(1300, 1250)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        driver.save_screenshot(os.environ["COILS_SCREENSHOT"])
    close()
    seen["closed"] = wait_for(driver, lambda: shown(driver, lambda p: p["state"].startswith("closed")), 30, "the close")
    return seen
