"""The server's line actions, started once the model is loaded: grades, alarms, the OPC UA server.

``server serve --grading FILE`` (grades and alarm rules) and ``--opcua-endpoint URL`` start them:
the rule file is checked against the line and the model's classes (a wrong file fails the start,
naming the key), the coil store grades coils at close, a :class:`server.line_monitor.LineMonitor`
follows the open coils and raises alarms into an :class:`server.line_monitor.AlarmBook` (kept in the
coil database when there is one), and the OPC UA server (:mod:`server.opcua`) publishes the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from server.line_monitor import AlarmBook, LineMonitor

log = logging.getLogger(__name__)


class LineActions:
    """What one server runs for the line beside the inspection (see the module's doc).

    ``server`` is the :class:`server.service.InspectionServer` (typed ``Any``: it imports this module).
    """

    def __init__(self, server: Any, monitor: LineMonitor) -> None:
        self.server, self.monitor = server, monitor
        self.book = monitor.book
        self.opcua = None
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, server: Any, class_names: Sequence[str]) -> LineActions | None:
        """Loads the rules and starts the monitor (and OPC UA); None when no flag asks for line actions.

        Raises:
            coils.grading.RuleError: the rule file is wrong (the message names the key).
        """
        from coils.alarms import load_alarms
        from coils.grading import load_grading

        cfg = server.config
        if cfg.grading is None and cfg.opcua_endpoint is None:
            return None
        assert cfg.line is not None  # ServerConfig checks both need --line
        rules = ()
        if cfg.grading is not None:
            server.grading = load_grading(cfg.grading, cfg.line, class_names)
            rules = load_alarms(cfg.grading, cfg.line, class_names)
        grader = server.grading.grade if server.grading is not None else None
        store = None
        if server.coils is not None:
            from coils.alarm_store import AlarmStore

            server.coils.store.grader = grader
            store = AlarmStore(server.coils.store)
        book = AlarmBook(server.metrics, store)
        verdict_of = (lambda summary: server.coils.store.verdict(summary, [])) if server.coils is not None else None
        monitor = LineMonitor(cfg.line, rules, book, grader, verdict_of, metrics=server.metrics)
        actions = cls(server, monitor)
        if server.coils is not None:
            server.coils.frame_listeners.append(monitor.on_frames)
            server.coils.close_listeners.append(monitor.on_closed)
        server.batch_listeners.append(monitor.on_batch)
        monitor.start()
        actions._watch = asyncio.get_running_loop().create_task(monitor.watch_server(server.is_serving, actions.drift))
        await actions._start_opcua(class_names)
        log.info("event=line_actions grading=%s alarm_rules=%d opcua=%s", cfg.grading, len(rules),
                 cfg.opcua_endpoint or "off")
        return actions

    async def _start_opcua(self, class_names: Sequence[str]) -> None:
        if self.server.config.opcua_endpoint is None:
            return
        from server.opcua import LineOpcUa

        self.opcua = await LineOpcUa.start(self.server, self, class_names)

    def drift(self) -> dict[str, list[str]]:
        """Per camera, the drift statistics over their thresholds now (none before the model serves)."""
        try:
            status = self.server.line_status()
        except RuntimeError:
            return {}
        return {c.camera_id: list(c.over_threshold) for c in status.cameras if c.over_threshold}

    async def stop(self) -> None:
        """Stops OPC UA, the server watch and the monitor."""
        if self.opcua is not None:
            await self.opcua.stop()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await asyncio.get_running_loop().run_in_executor(None, self.monitor.close)


__all__ = ["LineActions"]
