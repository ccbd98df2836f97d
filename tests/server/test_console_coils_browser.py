"""The console's coil pages in headless Chromium: a real server (capture on) with a real SQLite coil store.

Two cameras' frames of one coil are written to the store as the server's coil tracking writes them
(components from planted masks); camera ``cam0``'s first frames are also streamed through the
server, which captures them. ``/coils`` lists the coil; ``/coils/<id>`` shows its map with one mark
per record; a click on a defect from a captured frame shows that frame's crop, a click on one from a
frame that was not captured says so; a frame with a new defect arriving while the page is open
shows up on it, and so does the close. A screenshot is saved (to ``$COILS_SCREENSHOT`` when set:
``docs/console-coils.png`` is taken this way).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from coils.line import Line
from coils.records import FrameKey, frame_components
from tests.server.conftest import ServerThread
from tests.server.test_console_browser import (
    browser_missing_reason,
    chromium,
    start_console,
    stop_console,
    stream,
    wait_for,
)

pytestmark = pytest.mark.skipif(browser_missing_reason() is not None, reason=str(browser_missing_reason()))

ALONG, ACROSS, OVERLAP = 64, 320, 20  # the tiny model's frames; 1 mm pixels
COIL = "C 17/a"  # a space and a slash: the page and its links must carry any id
CAPTURED = 4  # cam0's frames 0..3 are streamed through the server, so captured


def coil_line() -> Line:
    cameras = [{"camera_id": f"cam{c}", "lane_start_mm": c * (ACROSS - OVERLAP), "mm_per_px_across": 1.0,
                "mm_per_px_along": 1.0, "along_axis": "y", "frame_width_px": ACROSS, "frame_height_px": ALONG}
               for c in range(2)]
    return Line.from_dict({"name": "console-test", "strip_width_mm": 2 * ACROSS - OVERLAP, "cameras": cameras})


def frame(line: Line, camera_id: str, frame_id: int, defects: dict[int, tuple[slice, slice]]):
    """One stored frame of ``COIL``: ``defects`` class -> (rows, columns) of a planted box."""
    from coils.store import FrameComponents

    camera = line.camera(camera_id)
    key, found = FrameKey(COIL, camera_id, frame_id), []
    for class_id, (rows, columns) in defects.items():
        mask = np.zeros((ALONG, ACROSS), np.uint8)
        mask[rows, columns] = 1
        found += frame_components(key, class_id, mask, frame_id * ALONG, camera, line.owned_across(camera_id))
    return FrameComponents(key, float(frame_id * ALONG), tuple(found), time.time())


def write_coil(store, line: Line) -> None:
    """Eight frames per camera: a stain in cam0's captured frame 1, a scratch in cam1's frame 6."""
    frames = [frame(line, camera.camera_id, f, {}) for f in range(8) for camera in line.cameras]
    frames[2] = frame(line, "cam0", 1, {1: (slice(10, 30), slice(40, 80))})
    frames[13] = frame(line, "cam1", 6, {3: (slice(5, 60), slice(100, 103))})
    assert store.write_frames(frames) == []


PAGE_JS = """
const marks = [...document.querySelectorAll("#map .defect")];
return {
  marks: marks.map((m) => [Number(m.dataset.record), Number(m.dataset.class)]),
  records: [...document.querySelectorAll("#records tbody tr")].length,
  state: document.getElementById("state") ? document.getElementById("state").textContent : "",
  crops: [...document.querySelectorAll("#defect figure.crop")].map((f) => {
    const img = f.querySelector("img");
    return {camera: f.dataset.camera, frame: Number(f.dataset.frame),
            size: img && img.complete ? [img.naturalWidth, img.naturalHeight] : null,
            text: f.querySelector(".not-captured") ? f.querySelector(".not-captured").textContent : null};
  }),
};
"""


def test_the_coil_pages_list_map_and_follow_the_coil(tiny_onnx, camera_frames, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from coils.store import CoilStore
    from server.capture import CaptureConfig, CapturePolicy

    line = coil_line()
    store = CoilStore.open(f"sqlite:///{tmp_path / 'coils.db'}", line)
    capture = CaptureConfig(tmp_path / "captures", policy=CapturePolicy.parse("sample:1"))
    thread = ServerThread(tiny_onnx, metrics_port=None, line=line, capture=capture)
    with thread as server, tempfile.TemporaryDirectory() as profile:
        server.coil_store = store  # what serve --coil-db makes (coil-serve); the pages read it from there
        stream(server.address, "cam0", camera_frames[:CAPTURED])
        wait_for_captures(tmp_path / "captures", CAPTURED)
        write_coil(store, line)
        console, driver = None, chromium(Path(profile))
        try:
            console = start_console(thread, refresh_hz=4)
            driver.get(console.url + "coils")
            link = wait_for(driver, lambda: driver.find_element(By.CSS_SELECTOR, "#coils tbody tr a"), 30, "the coil")
            listed = [driver.find_element(By.CSS_SELECTOR, f"#coils tbody tr td{c}").text
                      for c in ("", ".coil-state", ".defects", ".per-class")]
            link.click()
            page = wait_for(driver, lambda: shown(driver, lambda p: len(p["marks"]) == 2), 30, "the map's two marks")
            assert driver.current_url.endswith("/coils/" + quote(COIL, safe=""))
            click_mark(driver, 0)
            captured = wait_for(driver, lambda: shown(driver, lambda p: p["crops"] and p["crops"][0]["size"]), 30,
                                "the captured frame's crop")["crops"]
            click_mark(driver, 1)
            missing = wait_for(driver, lambda: shown(driver, lambda p: p["crops"] and p["crops"][0]["camera"] == "cam1"),
                               30, "the other record's frames")["crops"]
            click_mark(driver, 0)
            wait_for(driver, lambda: shown(driver, lambda p: p["crops"] and p["crops"][0]["size"]), 30, "the crop again")
            store.write_frames([frame(line, "cam0", 8, {2: (slice(20, 50), slice(200, 260))})])  # a frame arrives
            live = wait_for(driver, lambda: shown(driver, lambda p: len(p["marks"]) == 3), 30, "the new defect")
            if os.environ.get("COILS_SCREENSHOT"):
                driver.set_window_size(1300, 1250)
                driver.execute_script("window.scrollTo(0, 0)")
                time.sleep(0.5)
                driver.save_screenshot(os.environ["COILS_SCREENSHOT"])
            store.close_coil(COIL, 9 * ALONG, "end")
            closed = wait_for(driver, lambda: shown(driver, lambda p: p["state"].startswith("closed")), 30, "the close")
        finally:
            driver.quit()
            if console is not None:
                stop_console(thread, console)
            store.close()
    assert listed == [COIL, "open", "2", "pits/dents 1, scratches 1"]
    assert sorted(page["marks"]) == [[0, 1], [1, 3]] and page["records"] == 2
    assert page["state"] == "open (updates live)"
    # Record 0 lies across 40..80 mm of cam0's lane: the crop keeps that band and 32 px either side, every row.
    assert captured == [{"camera": "cam0", "frame": 1, "size": [104, ALONG], "text": None}]
    assert missing == [{"camera": "cam1", "frame": 6, "size": None, "text": "frame not captured"}]
    assert sorted(live["marks"]) == [[0, 1], [1, 3], [2, 2]]
    assert live["crops"][0]["size"] == [104, ALONG], "the selection stays while the coil updates"
    assert closed["state"].startswith("closed (end)") and len(closed["marks"]) == 3


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
