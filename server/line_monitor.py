"""The line's live state and alarms, off the inspection's hot path.

:class:`LineMonitor` takes each batch's coil frames from the coil tracker once they are stored (a
queue put on the writer thread, nothing more) and, on a thread of its own every ``interval_s``,
hands them to the coil watch (:class:`server.coil_watch.CoilWatch`, in a process of its own once
started): it merges them into each open coil's records, finds periodic defects, grades the coil so
far and evaluates the coil alarm rules. The server rules (drift over threshold, not serving) are
evaluated by :meth:`LineMonitor.watch_server` on the event loop, from the server's own status.

Raised alarms go to the :class:`AlarmBook`: kept in the coil database when there is one (shared by
replicas), counted in Prometheus, and handed to its listeners (the OPC UA server). An
acknowledgement (console, OPC UA) goes through the book too, so every side sees it.

Publishers read :meth:`LineMonitor.snapshot`: the open coils (length so far, defects per class,
grade so far, periodic defects), the last closed coil, per camera frames and last defect, frames/s.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from coils.alarms import Alarm, AlarmRule
from coils.line import Line
from coils.store import FrameComponents, StoreUnavailable
from server.coil_watch import BUDGET, CoilState, CoilWatch, WatchDied, WatchProcess, WatchResult, live_span_mm

if TYPE_CHECKING:
    from coils.alarm_store import AlarmStore
    from coils.summary import CoilSummary
    from coils.verdict import CoilVerdict, Grader
    from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

#: Seconds between two evaluations of the open coils.
INTERVAL_S = 0.25
#: Alarms the book keeps in memory (the database keeps them all).
KEEP = 500
#: Components waiting for the coil watch at most: past it, frames are left out of the live view (and
#: counted) rather than held without bound while the watch falls behind (at saturation it runs on
#: what inference leaves). About 200 MB of the densest frames; the records at close are whole.
MAX_PENDING = 50_000
#: Seconds between two log lines about frames left out.
SHED_LOG_S = 10.0


class AlarmBook:
    """Raised alarms and their acknowledgements: stored, counted, handed to listeners (thread-safe)."""

    def __init__(self, metrics: ServerMetrics | None, store: AlarmStore | None = None) -> None:
        self._metrics, self._store = metrics, store
        self._lock = threading.Lock()
        self._alarms: deque[Alarm] = deque(maxlen=KEEP)
        self._local_id = 0
        #: Called with an alarm when it is raised and when it is acknowledged (on the caller's thread).
        self.listeners: list[Callable[[Alarm], None]] = []

    def raise_alarm(self, alarm: Alarm) -> Alarm:
        """Keeps, counts and publishes ``alarm``; returns it with its id."""
        return self.raise_alarms([alarm])[0]

    def raise_alarms(self, alarms: Sequence[Alarm]) -> list[Alarm]:
        """Keeps (one database transaction for all), counts and publishes ``alarms``; returns them with ids."""
        if not alarms:
            return []
        try:
            alarms = self._store.add_many(alarms) if self._store is not None else list(alarms)
        except StoreUnavailable as exc:
            log.error("event=alarm_not_stored alarms=%d rules=%s: %s", len(alarms),
                      ",".join(sorted({a.rule for a in alarms})), exc)
        raised = []
        for alarm in alarms:
            with self._lock:
                if alarm.alarm_id == 0:
                    self._local_id -= 1  # kept in memory only: negative ids never meet the database's
                    alarm = replace(alarm, alarm_id=self._local_id)
                self._alarms.append(alarm)
            log.warning("event=alarm id=%d severity=%d %s", alarm.alarm_id, alarm.severity, alarm.message)
            if self._metrics is not None:
                self._metrics.alarms_raised.labels(alarm.rule).inc()
            self._publish(alarm)
            raised.append(alarm)
        if self._metrics is not None:
            self._metrics.alarms_unacknowledged.set(len(self.active()))
        return raised

    def acknowledge(self, alarm_id: int, by: str) -> Alarm:
        """Acknowledges an alarm (the first acknowledgement counts); KeyError for an unknown id."""
        now = time.time()
        stored = self._store.acknowledge(alarm_id, by, now) if self._store is not None and alarm_id > 0 else None
        with self._lock:
            for n, alarm in enumerate(self._alarms):
                if alarm.alarm_id == alarm_id:
                    stored = stored or (alarm if alarm.acknowledged else alarm.acknowledge(by, now))
                    self._alarms[n] = stored
        if stored is None:
            raise KeyError(f"no alarm {alarm_id}")
        if self._metrics is not None:
            self._metrics.alarms_unacknowledged.set(len(self.active()))
        self._publish(stored)
        return stored

    def active(self) -> list[Alarm]:
        """The alarms not acknowledged yet, oldest first."""
        with self._lock:
            return [a for a in self._alarms if not a.acknowledged]

    def recent(self, limit: int = 50) -> list[Alarm]:
        """The latest alarms, newest first."""
        with self._lock:
            return list(self._alarms)[::-1][:limit]

    def _publish(self, alarm: Alarm) -> None:
        for listener in self.listeners:
            try:
                listener(alarm)
            except Exception:  # noqa: BLE001 - a publisher's failure never stops the alarm
                log.exception("event=alarm_listener_error id=%d", alarm.alarm_id)


@dataclass(frozen=True)
class CameraState:
    frames: int = 0
    last_defect: str = ""  # "class K at A m, B mm across on coil C"


@dataclass(frozen=True)
class LineSnapshot:
    open_coils: tuple[CoilState, ...] = ()
    last_closed: CoilState | None = None
    cameras: dict[str, CameraState] = field(default_factory=dict)
    frames_per_s: float = 0.0


class LineMonitor:
    """Open coils' live records, periodic defects, grades so far and alarms (see the module's doc)."""

    def __init__(self, line: Line, rules: Sequence[AlarmRule], book: AlarmBook, grader: Grader | None = None,
                 verdict_of: Callable[[CoilSummary], CoilVerdict] | None = None,
                 interval_s: float = INTERVAL_S, budget: float = BUDGET, metrics: ServerMetrics | None = None,
                 max_pending: int = MAX_PENDING) -> None:
        self.line, self.rules, self.book = line, tuple(rules), book
        self.grader, self.verdict_of, self.interval_s, self.budget = grader, verdict_of, interval_s, budget
        self.metrics, self.max_pending = metrics, max_pending
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._pending = 0  # components queued for the watch (under _lock)
        self._shed_logged = -SHED_LOG_S
        #: In place until :meth:`start` puts it in a process of its own.
        self._watch: CoilWatch | WatchProcess = CoilWatch(line, self.rules, grader, budget)
        self._lock = threading.Lock()
        self._snapshot = LineSnapshot()
        self._cameras: Counter[str] = Counter()
        self._last_defect: dict[str, str] = {}
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="line-monitor", daemon=True)
        self._server_raised: set[tuple[str, str]] = set()
        #: Length of the live window (:data:`server.coil_watch.LIVE_TURNS`).
        self.span_mm = live_span_mm(line, self.rules)

    # ------------------------------------------------------------------ hooks (other threads)
    def on_frames(self, frames: list[FrameComponents]) -> None:
        """The coil tracker's frame listener: a queue put, or the frames left out of the live view when
        :data:`MAX_PENDING` components wait already."""
        size = sum(len(f.components) for f in frames)
        with self._lock:
            shed = self._pending + size > self.max_pending
            self._pending += 0 if shed else size
        if not shed:
            self._queue.put(("frames", (frames, size)))
            return
        if self.metrics is not None:
            self.metrics.line_watch_shed.inc(len(frames))
        if time.monotonic() - self._shed_logged >= SHED_LOG_S:
            self._shed_logged = time.monotonic()
            log.warning("event=line_watch_behind pending_components=%d: frames left out of the live view "
                        "(inspection_line_watch_shed_frames_total counts them)", self._pending)

    def on_closed(self, summary: CoilSummary) -> None:
        """The coil tracker's close listener."""
        self._queue.put(("closed", summary))

    def on_batch(self, batch: Any) -> None:
        """The server's batch listener: frames per camera (counters only)."""
        with self._lock:
            self._cameras.update(getattr(s, "camera_id", "") for s in batch.sources)

    def snapshot(self) -> LineSnapshot:
        """The line as of the last evaluation."""
        with self._lock:
            return self._snapshot

    # ------------------------------------------------------------------ the monitor's thread
    def start(self, process: bool = True) -> None:
        """Starts the monitor's thread; the coils' evaluation runs in a process of its own unless
        ``process`` is false (:mod:`server.coil_watch` says why)."""
        if process:
            self._watch = WatchProcess(self.line, self.rules, self.grader, self.budget)
            log.info("event=line_watch_started pid=%s", self._watch.pid)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if isinstance(self._watch, WatchProcess):
            self._watch.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.evaluate()
            except Exception:  # noqa: BLE001 - the monitor outlives one bad evaluation
                log.exception("event=line_monitor_error")

    def evaluate(self) -> None:
        """Takes what the hooks queued, has the watch re-evaluate the coils that changed, raises its
        alarms, publishes a new snapshot."""
        frames, closed = self._take_queue()
        last_closed = None
        for summary in closed:
            last_closed = self._closed_coil(summary)
        result = self._work(frames, [s.coil_id for s in closed], time.time())
        if result is not None:
            self.book.raise_alarms(result.alarms)
        with self._lock:
            if result is not None:
                self._last_defect.update(result.last_defect)
            total = sum(self._cameras.values())
            self._rate.append((time.monotonic(), total))
            cameras = {c: CameraState(n, self._last_defect.get(c, "")) for c, n in self._cameras.items()}
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
            open_coils = result.open_coils if result is not None else self._snapshot.open_coils
            self._snapshot = LineSnapshot(open_coils, last_closed or self._snapshot.last_closed, cameras,
                                          (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0)

    def _work(self, frames: list[FrameComponents], closed: list[str], now: float) -> WatchResult | None:
        """The watch's answer; None when its process died (a new one starts, the open coils' live state
        starts over: their records at close come from the database, whole)."""
        try:
            return self._watch.work(frames, closed, now)
        except WatchDied as exc:
            log.error("event=line_watch_died %s: starting a new one (the open coils' live view starts over)", exc)
            self._watch.close()
            self._watch = WatchProcess(self.line, self.rules, self.grader, self.budget)
            return None

    def _take_queue(self) -> tuple[list[FrameComponents], list[CoilSummary]]:
        frames: list[FrameComponents] = []
        closed: list[CoilSummary] = []
        while True:
            try:
                kind, item = self._queue.get_nowait()
            except queue.Empty:
                return frames, closed
            if kind == "frames":
                taken, size = item
                frames += taken
                with self._lock:
                    self._pending -= size
            else:
                closed.append(item)

    def _closed_coil(self, summary: CoilSummary) -> CoilState:
        verdict = self.verdict_of(summary) if self.verdict_of is not None else None
        return CoilState(summary.coil_id, summary.length_mm, summary.frames, dict(summary.defects_per_class),
                         verdict.grade if verdict else "", verdict.grade_rule if verdict else "",
                         verdict.periodic if verdict else (), "closed")

    # ------------------------------------------------------------------ server rules (event loop)
    async def watch_server(self, serving: Callable[[], bool], drifting: Callable[[], dict[str, list[str]]]) -> None:
        """Evaluates ``drift`` and ``not_serving`` rules every ``interval_s`` until cancelled."""
        down_since: float | None = None
        while True:
            await asyncio.sleep(self.interval_s)
            now = time.time()
            down_since = None if serving() else (down_since or now)
            over = drifting() if any(r.kind == "drift" for r in self.rules) else {}
            for rule in self.rules:
                if rule.kind == "not_serving":
                    self._server_alarm(rule, "", down_since is not None and now - down_since >= rule.after_s,
                                       f"{rule.name}: the inspection server is not serving", now)
                elif rule.kind == "drift":
                    for camera in set(over) | {c for r, c in self._server_raised if r == rule.name}:
                        self._server_alarm(rule, camera, bool(over.get(camera)), f"{rule.name}: camera {camera}'s "
                                           f"images drifted ({', '.join(over.get(camera, []))} over threshold)", now)

    def _server_alarm(self, rule: AlarmRule, camera: str, on: bool, message: str, now: float) -> None:
        """Raises once when the condition starts; re-arms when it ends."""
        key = (rule.name, camera)
        if on and key not in self._server_raised:
            self._server_raised.add(key)
            self.book.raise_alarm(Alarm(0, rule.name, rule.kind, rule.severity, "", camera, None, message, now))
        elif not on:
            self._server_raised.discard(key)


__all__ = ["AlarmBook", "CameraState", "CoilState", "INTERVAL_S", "LineMonitor", "LineSnapshot"]
