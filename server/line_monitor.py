"""The line's live state and alarms, off the inspection's hot path.

:class:`LineMonitor` takes each batch's coil frames from the coil tracker once they are stored (a
queue put on the writer thread, nothing more) and, on a thread of its own every ``interval_s``,
merges them into each open coil's records (an incremental :class:`coils.records.RecordBuilder`),
finds periodic defects, grades the coil so far and evaluates the coil alarm rules
(:class:`coils.alarms.CoilAlarms`). The server rules (drift over threshold, not serving) are
evaluated by :meth:`LineMonitor.watch_server` on the event loop, from the server's own status.

Raised alarms go to the :class:`AlarmBook`: kept in the coil database when there is one (shared by
replicas), counted in Prometheus, and handed to its listeners (the OPC UA server). An
acknowledgement (console, OPC UA) goes through the book too, so every side sees it.

Publishers read :meth:`LineMonitor.snapshot`: the open coils (length so far, defects per class,
grade so far, periodic defects), the last closed coil, per camera frames and last defect, frames/s.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from coils.alarms import Alarm, AlarmRule, CoilAlarms
from coils.line import Line
from coils.periodic import PeriodicConfig, PeriodicDefect, band_keys, find_periodic, max_period_mm
from coils.records import DefectRecord, RecordBuilder
from coils.store import FrameComponents, StoreUnavailable
from coils.summary import CoilFacts, CoilSummary, summarise

if TYPE_CHECKING:
    from coils.alarm_store import AlarmStore
    from coils.verdict import CoilVerdict, Grader
    from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

#: Seconds between two evaluations of the open coils.
INTERVAL_S = 0.25
#: An open coil is evaluated again only after this many times its last evaluation's duration: the
#: monitor's share of a core stays under 1 / BUDGET however long the coil grows (it shares the GIL).
BUDGET = 20
#: The search on an open coil: it runs again and again as the coil grows, so each run's chance of a
#: random find is held 100 times lower than at close (a true repeat passes it a few turns later).
LIVE_PERIODIC = PeriodicConfig(alpha=1e-6)
#: The live search and the coil alarms look at the coil's last this many longest periods (and at least
#: each density rule's window): a repeat shows within a few turns, and the work stays bounded however
#: long the coil grows. Finds that slid out of it are kept; the whole coil is searched at close.
LIVE_TURNS = 16
#: Seconds between two grades so far of an open coil whose periodic defects did not change.
GRADE_EVERY_S = 5.0
#: An open coil without a frame for this long is dropped (closed elsewhere: another replica, a restart).
STALE_S = 300.0
#: Closed coils remembered (their late frames are not taken for a new coil).
CLOSED_KEPT = 1000
#: Alarms the book keeps in memory (the database keeps them all).
KEEP = 500


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
        try:
            alarm = self._store.add(alarm) if self._store is not None else alarm
        except StoreUnavailable as exc:
            log.error("event=alarm_not_stored rule=%s: %s", alarm.rule, exc)
        with self._lock:
            if alarm.alarm_id == 0:
                self._local_id -= 1  # kept in memory only: negative ids never meet the database's
                alarm = replace(alarm, alarm_id=self._local_id)
            self._alarms.append(alarm)
        log.warning("event=alarm id=%d severity=%d %s", alarm.alarm_id, alarm.severity, alarm.message)
        if self._metrics is not None:
            self._metrics.alarms_raised.labels(alarm.rule).inc()
            self._metrics.alarms_unacknowledged.set(len(self.active()))
        self._publish(alarm)
        return alarm

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
class CoilState:
    """An open coil as it stands, or the last closed one."""

    coil_id: str
    length_mm: float
    frames: int
    defects_per_class: dict[int, int]
    grade: str = ""
    grade_rule: str = ""
    periodic: tuple[PeriodicDefect, ...] = ()
    state: str = "open"


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


@dataclass
class _OpenCoil:
    builder: RecordBuilder
    alarms: CoilAlarms
    frames: int = 0
    far_end_mm: float = 0.0
    dirty: bool = True
    next_at: float = 0.0  # time.monotonic() before which it is not evaluated again
    last_frame_at: float = field(default_factory=time.monotonic)
    state: CoilState | None = None
    evaluated_to_mm: float = 0.0  # the far end at its last evaluation
    periodic: dict[tuple[int, str, int], PeriodicDefect] = field(default_factory=dict)  # found so far, by place
    graded_at: float = -math.inf  # time.monotonic() of its last grade so far
    graded_places: frozenset[tuple[int, str, int]] = frozenset()  # the periodic defects' places it saw
    known: dict[int, DefectRecord] = field(default_factory=dict)  # the last window's records by id (kept alive)


class LineMonitor:
    """Open coils' live records, periodic defects, grades so far and alarms (see the module's doc)."""

    def __init__(self, line: Line, rules: Sequence[AlarmRule], book: AlarmBook, grader: Grader | None = None,
                 verdict_of: Callable[[CoilSummary], CoilVerdict] | None = None,
                 interval_s: float = INTERVAL_S, budget: float = BUDGET) -> None:
        self.line, self.rules, self.book = line, tuple(rules), book
        self.grader, self.verdict_of, self.interval_s, self.budget = grader, verdict_of, interval_s, budget
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._coils: dict[str, _OpenCoil] = {}
        self._closed: dict[str, None] = {}  # insertion-ordered: the oldest forgotten first
        self._lock = threading.Lock()
        self._snapshot = LineSnapshot()
        self._cameras: Counter[str] = Counter()
        self._last_defect: dict[str, str] = {}
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="line-monitor", daemon=True)
        self._server_raised: set[tuple[str, str]] = set()
        #: Length of the live window (:data:`LIVE_TURNS`).
        self.span_mm = max([LIVE_TURNS * max_period_mm(line, LIVE_PERIODIC)]
                           + [r.window_m * 1000 for r in self.rules if r.kind == "density"])

    # ------------------------------------------------------------------ hooks (other threads)
    def on_frames(self, frames: list[FrameComponents]) -> None:
        """The coil tracker's frame listener: a queue put, nothing more."""
        self._queue.put(("frames", frames))

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
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.evaluate()
            except Exception:  # noqa: BLE001 - the monitor outlives one bad evaluation
                log.exception("event=line_monitor_error")

    def evaluate(self) -> None:
        """Takes what the hooks queued, re-evaluates the coils that changed, publishes a new snapshot."""
        last_closed = self._take_queue()
        now = time.time()
        for coil_id in [c for c, coil in self._coils.items() if time.monotonic() - coil.last_frame_at > STALE_S]:
            del self._coils[coil_id]
        for coil_id, coil in self._coils.items():
            if coil.dirty and time.monotonic() >= coil.next_at:
                started = time.monotonic()
                coil.dirty = False
                coil.state = self._evaluate_coil(coil_id, coil, now)
                # a long coil's evaluation takes a while: wait BUDGET times as long before the next one
                coil.next_at = started + self.budget * (time.monotonic() - started)
        with self._lock:
            total = sum(self._cameras.values())
            self._rate.append((time.monotonic(), total))
            cameras = {c: CameraState(n, self._last_defect.get(c, "")) for c, n in self._cameras.items()}
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
            self._snapshot = LineSnapshot(
                tuple(c.state for c in self._coils.values() if c.state is not None),
                last_closed or self._snapshot.last_closed, cameras, (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0)

    def _take_queue(self) -> CoilState | None:
        last_closed = None
        while True:
            try:
                kind, item = self._queue.get_nowait()
            except queue.Empty:
                return last_closed
            if kind == "frames":
                self._add_frames(item)
            else:
                last_closed = self._closed_coil(item) or last_closed

    def _add_frames(self, frames: list[FrameComponents]) -> None:
        for frame in frames:
            coil_id = frame.key.coil_id
            if coil_id in self._closed:
                continue
            coil = self._coils.get(coil_id)
            if coil is None:
                coil = self._coils[coil_id] = _OpenCoil(RecordBuilder(self.line), CoilAlarms(self.rules, coil_id))
            if coil.builder.add_components(frame.key, frame.components):
                coil.last_frame_at = time.monotonic()
                coil.frames += 1
                camera = self.line.camera(frame.key.camera_id)
                coil.far_end_mm = max(coil.far_end_mm, frame.position_mm + camera.frame_length_mm)
                coil.dirty = True
            if frame.components:
                c = frame.components[0]
                self._last_defect[frame.key.camera_id] = (
                    f"class {c.class_id} at {c.along_start_mm / 1000:.3f} m, {c.across_start_mm:.0f} mm across "
                    f"on coil {coil_id}")

    def _closed_coil(self, summary: CoilSummary) -> CoilState | None:
        self._coils.pop(summary.coil_id, None)
        self._closed[summary.coil_id] = None
        while len(self._closed) > CLOSED_KEPT:
            del self._closed[next(iter(self._closed))]
        verdict = self.verdict_of(summary) if self.verdict_of is not None else None
        return CoilState(summary.coil_id, summary.length_mm, summary.frames, dict(summary.defects_per_class),
                         verdict.grade if verdict else "", verdict.grade_rule if verdict else "",
                         verdict.periodic if verdict else (), "closed")

    def _evaluate_coil(self, coil_id: str, coil: _OpenCoil, now: float) -> CoilState:
        records = coil.builder.records(coil_id)
        if coil.state is not None and len(records) == sum(coil.state.defects_per_class.values()):
            return replace(coil.state, length_mm=coil.far_end_mm, frames=coil.frames)  # clean frames: nothing new
        recent = self._recent(records, coil)
        # only the bands new or grown records fell in are searched again; the others' finds are kept
        changed = {key for r in recent if id(r) not in coil.known for key in band_keys(r, LIVE_PERIODIC)}
        coil.known = {id(r): r for r in recent}
        found = find_periodic(self.line, recent, LIVE_PERIODIC, changed)
        for p in found:
            coil.periodic[(p.class_id, p.roll, round(p.across_start_mm / LIVE_PERIODIC.band_mm))] = p
        periodic = tuple(sorted(coil.periodic.values(), key=lambda d: (-d.count, d.class_id, d.first_mm)))
        for alarm in coil.alarms.evaluate(recent, found, now):  # the finds' record numbers are in ``recent``
            self.book.raise_alarm(alarm)
        grade, rule = self._grade(coil_id, coil, records, periodic, now)
        return CoilState(coil_id, coil.far_end_mm, coil.frames, dict(sorted(Counter(r.class_id for r in records)
                                                                          .items())), grade, rule, periodic)

    def _grade(self, coil_id: str, coil: _OpenCoil, records: list[DefectRecord],
               periodic: tuple[PeriodicDefect, ...], now: float) -> tuple[str, str]:
        """The grade so far: again when a periodic defect was found at a new place, else at most every
        ``GRADE_EVERY_S`` (it reads every record of the coil; the grade that counts is given at close)."""
        last, places = coil.state, frozenset(coil.periodic)
        if last is not None and places == coil.graded_places and time.monotonic() < coil.graded_at + GRADE_EVERY_S:
            return last.grade, last.grade_rule
        coil.graded_at, coil.graded_places = time.monotonic(), places
        if self.grader is None:
            return "", ""
        summary = summarise(CoilFacts(coil_id, "open", now, now, None, "", coil.far_end_mm, coil.frames, 0), records)
        return self.grader(summary, records, periodic)

    def _recent(self, records: list[DefectRecord], coil: _OpenCoil) -> list[DefectRecord]:
        """The records (sorted along) of the live window: from ``span`` before the far end of the last
        evaluation (so none since is missed), but never more than four spans back."""
        start = max(min(coil.evaluated_to_mm, coil.far_end_mm) - self.span_mm, coil.far_end_mm - 4 * self.span_mm)
        coil.evaluated_to_mm = coil.far_end_mm
        return records[bisect.bisect_left(records, start, key=lambda r: r.along_start_mm):]

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
