"""The console's alarm banner on a real server: the unacknowledged alarms listed, acknowledged from the
console (stored in the coil database, published to the book's listeners), a POST without the
console's header refused; the banner script is on every page."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from coils.alarms import Alarm
from tests.server.conftest import running_server
from tests.server.test_coil_tracking import _line, coil_folder, coil_model  # noqa: F401


def test_an_alarm_shows_until_acknowledged_from_the_console(coil_model, coil_folder, tmp_path) -> None:  # noqa: F811
    from server.console import Console, ConsoleConfig

    (tmp_path / "rules.yaml").write_text("alarms:\n  - {name: roll-mark, kind: periodic, severity: 800}\n")

    async def main():
        async with running_server(coil_model, line=_line(coil_folder), coil_db=f"sqlite:///{tmp_path}/coils.db",
                                  grading=tmp_path / "rules.yaml") as server:
            book = server.line_actions.book
            heard = []
            book.listeners.append(heard.append)
            raised = book.raise_alarm(Alarm(0, "roll-mark", "periodic", 800, "C7", "cam0", 1234.0,
                                            "roll-mark: class 1 repeats every 1885 mm on coil C7", time.time()))
            console = Console(server, ConsoleConfig(port=0))
            await console.start()
            try:
                async with aiohttp.ClientSession() as session:
                    before = await (await session.get(console.url + "api/alarms")).json()
                    forged = await session.post(console.url + f"api/alarms/ack?id={raised.alarm_id}")
                    acked = await session.post(console.url + f"api/alarms/ack?id={raised.alarm_id}",
                                               headers={"X-Console": "ack"})
                    unknown = await session.post(console.url + "api/alarms/ack?id=999", headers={"X-Console": "ack"})
                    after = await (await session.get(console.url + "api/alarms")).json()
                    page = await (await session.get(console.url)).text()
                    script = await session.get(console.url + "alarms.js")
                    stored = book._store.recent(5)
            finally:
                await console.stop()
        return raised, before, forged.status, acked.status, unknown.status, after, page, script.status, stored, heard

    raised, before, forged, acked, unknown, after, page, script, stored, heard = asyncio.run(main())
    assert [a["alarm_id"] for a in before["active"]] == [raised.alarm_id] and raised.alarm_id > 0
    assert (forged, acked, unknown) == (403, 200, 404)
    assert after["active"] == [] and after["recent"][0]["acknowledged_by"] == "console"
    assert stored[0].alarm_id == raised.alarm_id and stored[0].acknowledged_by == "console"
    assert [a.acknowledged for a in heard] == [False, True]  # OPC UA hears the console's acknowledgement
    assert '<script src="/alarms.js"></script>' in page and script == 200
