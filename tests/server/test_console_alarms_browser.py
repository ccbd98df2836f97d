"""The alarm banner in headless Chromium: an alarm shows on the console page until acknowledged, by its
button (stored as acknowledged by the console) or elsewhere (as over OPC UA: the banner drops it)."""

from __future__ import annotations

import time

import pytest

from coils.alarms import Alarm
from tests.server.conftest import ServerThread
from tests.server.test_coil_tracking import _line, coil_folder, coil_model  # noqa: F401
from tests.server.test_console_browser import (
    browser_missing_reason,
    chromium,
    start_console,
    stop_console,
    wait_for,
)

pytestmark = pytest.mark.skipif(browser_missing_reason() is not None, reason=str(browser_missing_reason()))

BANNER_JS = """
const rows = [...document.querySelectorAll('#alarm-banner .alarm')];
return {shown: getComputedStyle(document.getElementById('alarm-banner')).display !== 'none',
        ids: rows.map((r) => Number(r.dataset.alarmId)), text: rows.map((r) => r.textContent).join('|')};
"""


def test_the_banner_shows_an_alarm_until_it_is_acknowledged(coil_model, coil_folder, tmp_path):  # noqa: F811
    (tmp_path / "rules.yaml").write_text("alarms:\n  - {name: roll-mark, kind: periodic, severity: 800}\n")
    thread = ServerThread(coil_model, line=_line(coil_folder), coil_db=f"sqlite:///{tmp_path}/coils.db",
                          grading=tmp_path / "rules.yaml")
    with thread as server:
        book = server.line_actions.book
        first = book.raise_alarm(Alarm(0, "roll-mark", "periodic", 800, "C7", "cam0", 1234.0,
                                       "roll-mark: class 1 repeats every 1885 mm on coil C7", time.time()))
        console = start_console(thread)
        driver = chromium(tmp_path / "profile")
        try:
            driver.get(console.url)

            def banner() -> dict:
                return driver.execute_script(BANNER_JS)

            wait_for(driver, lambda: banner()["ids"] == [first.alarm_id], 20, "the alarm in the banner")
            assert banner()["shown"] and "repeats every 1885 mm on coil C7" in banner()["text"]
            driver.find_element("css selector", "#alarm-banner .alarm button").click()
            wait_for(driver, lambda: not banner()["shown"], 20, "the banner gone after the click")
            second = book.raise_alarm(Alarm(0, "roll-mark", "periodic", 800, "C8", "cam1", 99.0, "second", time.time()))
            wait_for(driver, lambda: banner()["ids"] == [second.alarm_id], 20, "the second alarm")
            book.acknowledge(second.alarm_id, "opcua:operator")  # as an OPC UA user would
            wait_for(driver, lambda: not banner()["shown"], 20, "the banner gone after the OPC UA acknowledgement")
        finally:
            driver.quit()
            stop_console(thread, console)
        stored = {a.alarm_id: a.acknowledged_by for a in book._store.recent(5)}
    assert stored == {first.alarm_id: "console", second.alarm_id: "opcua:operator"}
