"""The console's alarm banner: ``/api/alarms`` (the unacknowledged and the latest alarms) and
``POST /api/alarms/ack?id=N`` (acknowledge), plus ``/alarms.js``, the banner every console page loads.

The alarms are the server's alarm book (:class:`server.line_monitor.AlarmBook`, ``server serve
--grading FILE`` with ``alarms:``): an acknowledgement made here is stored in the coil database and
published to OPC UA clients, and one made over OPC UA disappears from the banner. The POST must carry
the header ``X-Console: ack``, which a cross-site form cannot send (a browser would ask first), so
another site cannot acknowledge alarms through an operator's browser. Store writes run off the event
loop.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

#: Latest alarms the banner's list shows.
RECENT = 20


class AlarmBanner:
    """The alarm routes of one console; ``server`` is the :class:`server.service.InspectionServer`."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def routes(self) -> list[Any]:
        from aiohttp import web

        return [web.get("/api/alarms", self._list), web.post("/api/alarms/ack", self._ack),
                web.get("/alarms.js", self._script)]

    def _book(self) -> Any:
        actions = getattr(self.server, "line_actions", None)
        return actions.book if actions is not None else None

    async def _list(self, request: Any) -> Any:
        from aiohttp import web

        book = self._book()
        if book is None:
            return web.json_response({"enabled": False, "active": [], "recent": []})
        return web.json_response({"enabled": True, "active": [a.to_dict() for a in book.active()],
                                  "recent": [a.to_dict() for a in book.recent(RECENT)]})

    async def _ack(self, request: Any) -> Any:
        from aiohttp import web

        if request.headers.get("X-Console") != "ack":
            raise web.HTTPForbidden(text="acknowledge from the console page (header X-Console: ack)")
        book = self._book()
        if book is None:
            raise web.HTTPNotFound(text="no alarms on this server (server serve --grading FILE with alarms:)")
        try:
            alarm_id = int(request.query.get("id", ""))
        except ValueError:
            raise web.HTTPBadRequest(text="id: expected an alarm id") from None
        loop = asyncio.get_running_loop()
        try:
            alarm = await loop.run_in_executor(None, book.acknowledge, alarm_id, "console")
        except KeyError:
            raise web.HTTPNotFound(text=f"no alarm {alarm_id}") from None
        return web.json_response(alarm.to_dict())

    async def _script(self, request: Any) -> Any:
        from aiohttp import web

        text = resources.files("server").joinpath("console_static/alarms.js").read_text()
        return web.Response(text=text, content_type="application/javascript")


__all__ = ["AlarmBanner"]
