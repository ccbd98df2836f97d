"""The console in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) via Selenium.

A real server on 127.0.0.1 serves the tiny drift-monitored model with capture on; the page is
opened first, then two cameras stream frames; the test waits until the page shows every frame,
and checks the camera ids, class names, per-class pixel counts and decisions of the latest frame,
defective-frame totals and thumbnails against the streamed answers. It clicks a thumbnail, and
saves a screenshot (to the test's tmp folder, and to ``$CONSOLE_SCREENSHOT`` when set: the
``docs/console.png``, shown in docs/serving.md, is taken this way).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.server.conftest import ServerThread, line_frames
from tests.server.test_console import expected_camera
from tests.server.test_service import make_request

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
# Without the background-networking flags Chromium waits on services it cannot reach here.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1500")
FRAMES_PER_CAMERA = 24


def browser_missing_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if CHROMIUM is None:
        return "chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)"
    if CHROMEDRIVER is None:
        return "chromedriver is not installed (apt-get install chromium-driver; .ci/run does it)"
    return None


pytestmark = pytest.mark.skipif(browser_missing_reason() is not None, reason=str(browser_missing_reason()))


def start_console(thread: ServerThread, **config):
    """A :class:`server.console.Console` on ``thread``'s server, started on the server's event loop."""
    from server.console import Console, ConsoleConfig

    console = Console(thread.server, ConsoleConfig(port=0, **config))
    asyncio.run_coroutine_threadsafe(console.start(), thread._loop).result(30)
    return console


def stop_console(thread: ServerThread, console) -> None:
    asyncio.run_coroutine_threadsafe(console.stop(), thread._loop).result(30)


def chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def stream(address: str, camera_id: str, frames: np.ndarray) -> list:
    import grpc

    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InspectionServiceStub(channel)
        return list(stub.Inspect(make_request(camera_id, i, f) for i, f in enumerate(frames)))


PAGE_CAMERA_JS = """
const card = document.querySelector(`section.camera[data-camera="${arguments[0]}"]`);
if (!card) return null;
const rows = [...card.querySelectorAll("table.classes tbody tr")];
const cell = (r, c) => r.querySelector(c).textContent;
return {
  frames: Number(card.querySelector(".camera-stats").dataset.frames),
  names: rows.map((r) => cell(r, ".name")),
  latest_frame: Number(card.querySelector("img.live").dataset.frame),
  latest_counts: rows.map((r) => Number(cell(r, ".latest-count"))),
  decisions: rows.map((r) => cell(r, ".latest-state")),
  defective_frames: rows.map((r) => Number(cell(r, ".defective-frames"))),
  thumbnails: [...card.querySelectorAll("figure.thumb")].map((t) => Number(t.dataset.frame)),
  caption: card.querySelector(".frame-caption").textContent,
};
"""


def page_camera(driver, camera_id: str) -> dict:
    """What one camera's card shows, read in one script (the page re-renders while it updates)."""
    shown = driver.execute_script(PAGE_CAMERA_JS, camera_id)
    if shown is None:
        raise ValueError(f"no card for camera {camera_id} yet")
    return shown


def wait_for(driver, predicate, timeout: float, what: str):
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def check(_):
        try:
            return predicate()
        except (StaleElementReferenceException, WebDriverException, ValueError):
            return False  # the page re-rendered under us, or is not there yet

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(check)
    except Exception as exc:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; page text:\n"
                             f"{driver.find_element('tag name', 'body').text[:3000]}") from exc


def test_console_in_chromium_shows_the_streamed_answers(drift_onnx, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from server.capture import CaptureConfig, CapturePolicy

    frames = line_frames(2 * FRAMES_PER_CAMERA, seed=21)
    config = {"metrics_port": None, "max_batch": 4, "drift_window": 20, "drift_min_frames": 10}
    config["capture"] = CaptureConfig(tmp_path / "captures", policy=CapturePolicy.parse("defects"))
    thread = ServerThread(drift_onnx, **config)
    with thread as server, tempfile.TemporaryDirectory() as profile:
        console = None
        driver = chromium(Path(profile))
        try:
            console = start_console(thread, refresh_hz=4, thumbnails=4)
            driver.get(console.url)
            wait_for(driver, lambda: driver.find_element(By.ID, "connection").text == "live", 30, "the event stream")
            answers = {cam: stream(server.address, cam, frames[k::2]) for k, cam in enumerate(("cam-1", "cam-2"))}
            for camera_id, camera_answers in answers.items():
                want = expected_camera(camera_answers)

                def complete(c=camera_id, want=want) -> bool:
                    page = page_camera(driver, c)
                    return (page["frames"] == FRAMES_PER_CAMERA and page["latest_frame"] == want["latest_frame"]
                            and len(page["thumbnails"]) == min(4, len(want["defective_ids"])))

                wait_for(driver, complete, 60, f"camera {camera_id}'s {FRAMES_PER_CAMERA} frames on the page")
            wait_for(driver, lambda: all(
                driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                for img in driver.find_elements(By.CSS_SELECTOR, "img.live, figure.thumb img")), 30, "the images")
            cameras = [s.get_attribute("data-camera") for s in driver.find_elements(By.CSS_SELECTOR, "section.camera")]
            shown = {cam: page_camera(driver, cam) for cam in answers}
            legend = driver.find_element(By.ID, "legend").text
            # A thumbnail click shows that defective frame in the main view.
            clicked = shown["cam-1"]["thumbnails"][-1]

            def click() -> bool:
                driver.find_element(By.CSS_SELECTOR, f'section.camera[data-camera="cam-1"] '
                                                     f'figure.thumb[data-frame="{clicked}"]').click()
                return True

            wait_for(driver, click, 10, "a thumbnail to click")
            wait_for(driver, lambda: page_camera(driver, "cam-1")["latest_frame"] == clicked, 10, "the clicked frame")
            caption = page_camera(driver, "cam-1")["caption"]
            header = driver.find_element(By.TAG_NAME, "header").text
            driver.execute_script("window.scrollTo(0, 0)")
            screenshot = tmp_path / "console.png"
            assert driver.save_screenshot(str(screenshot))
            if os.environ.get("CONSOLE_SCREENSHOT"):
                shutil.copyfile(screenshot, os.environ["CONSOLE_SCREENSHOT"])
            print(f"console screenshot: {screenshot}")
        finally:
            driver.quit()
            if console is not None:
                stop_console(thread, console)

    assert cameras == ["cam-1", "cam-2"]
    names = ["pits/dents", "stains", "scratches", "cracks/scabs"]
    for k, name in enumerate(names):
        assert f"{k + 1} {name}" in legend
    from engine.backends import choose_backend

    # The header names the backend the server runs (the auto choice for this CPU).
    assert choose_backend(drift_onnx, "cpu")[0] in header and "errors none" in header
    for camera_id, camera_answers in answers.items():
        want, page = expected_camera(camera_answers), shown[camera_id]
        assert page["names"] == [f"{k + 1} {n}" for k, n in enumerate(names)]
        assert page["frames"] == FRAMES_PER_CAMERA
        assert page["latest_frame"] == want["latest_frame"]
        assert page["latest_counts"] == want["latest_counts"]
        assert page["decisions"] == [
            "present" if p else ("discarded" if n else "absent")
            for p, n in zip(want["latest_present"], want["latest_counts"])
        ]
        assert page["defective_frames"] == want["defective_frames"]
        assert page["thumbnails"] == want["defective_ids"][::-1][:4]
    assert sum(shown["cam-1"]["defective_frames"]) > 0, "the tiny model finds defects on these frames"
    assert caption.startswith(f"defective frame {clicked}")
    assert screenshot.stat().st_size > 10_000



def test_the_page_shows_the_cameras_seen_most_recently_and_says_how_many_it_does_not(tiny_onnx, camera_frames):
    from selenium.webdriver.common.by import By

    thread = ServerThread(tiny_onnx, metrics_port=None)
    with thread as server, tempfile.TemporaryDirectory() as profile:
        console = None
        driver = chromium(Path(profile))
        try:
            console = start_console(thread, refresh_hz=4, max_cameras=2)
            driver.get(console.url)
            wait_for(driver, lambda: driver.find_element(By.ID, "connection").text == "live", 30, "the event stream")

            def cards() -> list[str]:
                return [s.get_attribute("data-camera") for s in driver.find_elements(By.CSS_SELECTOR, "section.camera")]

            stream(server.address, "retired", camera_frames[:2])
            stream(server.address, "cam-1", camera_frames[2:4])
            wait_for(driver, lambda: cards() == ["retired", "cam-1"], 30, "two cameras")
            assert not driver.find_element(By.ID, "hidden-cameras").is_displayed()
            stream(server.address, "cam-2", camera_frames[4:6])  # a third camera: "retired" makes room
            wait_for(driver, lambda: cards() == ["cam-1", "cam-2"], 30, "the new camera in the retired one's place")
            hidden = driver.find_element(By.ID, "hidden-cameras")
            wait_for(driver, hidden.is_displayed, 10, "the count of cameras not shown")
            text = hidden.text
        finally:
            driver.quit()
            if console is not None:
                stop_console(thread, console)
    assert text == "1 camera not shown: the console shows the 2 cameras seen most recently"
