"""The open coils' live evaluation: records merged frame by frame, periodic defects, alarms, grades so far.

:class:`CoilWatch` is the computing part of the line monitor (:mod:`server.line_monitor`): given the
frames stored since its last call and the coils closed since, :meth:`CoilWatch.work` merges the
frames into each open coil's records (an incremental :class:`coils.records.RecordBuilder`), finds
periodic defects, grades the coil so far and evaluates the coil alarm rules. It holds no thread and
no lock: the monitor calls it in its own process (:class:`WatchProcess`, what ``server serve`` runs)
or in place (tests, :meth:`server.line_monitor.LineMonitor.evaluate`).

Why a process of its own: on a dense coil an evaluation is pure Python and numpy for tens to
hundreds of milliseconds; on the server's threads it would hold the interpreter lock the batcher and
the gRPC handlers need, and at saturation it would take its cycles from inference. In a process in
the idle scheduling class (:func:`lower_priority`) it runs only on cycles no serving thread wants, and
the serving process pays only for sending the frames' components once per interval, as columns
(:class:`server.watch_wire.WatchFrames`).
"""

from __future__ import annotations

import bisect
import gc
import logging
import math
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from coils import periodic
from coils.alarms import Alarm, AlarmRule, CoilAlarms
from coils.line import Line
from coils.periodic import PeriodicConfig, PeriodicDefect, band_keys, find_periodic, max_period_mm
from coils.records import DefectRecord, RecordBuilder
from coils.store import FrameComponents
from coils.summary import CoilFacts, summarise
from server.watch_wire import WatchFrames

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from coils.verdict import Grader

log = logging.getLogger(__name__)

#: An open coil is evaluated again only after this many times its last evaluation's duration: the
#: watch's share of a core stays under 1 / BUDGET however long the coil grows. At 20 the evaluations of
#: ``bench stream``'s dense coil (tens of thousands of defects, ~0.5 s an evaluation) were a third of the
#: watch's CPU, and on a 2-core machine the watch's CPU is the line actions' cost, even in the idle
#: scheduling class (benchmarks/RESULTS.md); a strip's coil evaluates in milliseconds, so at 100 its
#: alarms still come within a fraction of a second.
BUDGET = 100
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
#: The watch process' niceness over the server's where the idle scheduling class is not available (the
#: lowest priority). At 10 it still took its share of a saturated CPU: line actions cost 7-8 % of ``bench
#: stream``'s frames/s at 16 streams, against 0.7-5.5 % at 19 (benchmarks/RESULTS.md).
NICE = 19
#: The watch process looks for reference cycles among the objects of one call in this many (and of a call that
#: failed); the others' are frozen unexamined. The collector found no cycle in any call of a dense coil's
#: (records, components, finds: none holds one), and walking each call's objects cost 0.02 ms a frame, a
#: sixth of the watch's whole budget. 1 examines every call's.
COLLECT_EVERY = 16
#: Seconds the monitor waits for one answer of the watch process before it takes it for hung.
ANSWER_TIMEOUT_S = 120.0

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
class WatchResult:
    """One :meth:`CoilWatch.work`: the open coils as they stand, the alarms raised, each camera's last defect."""

    open_coils: tuple[CoilState, ...]
    alarms: tuple[Alarm, ...]
    last_defect: dict[str, str]


@dataclass(frozen=True)
class _Answer:
    """A :class:`WatchResult` on the pipe: an open coil's state as it was in the last answer is its id only."""

    open_coils: tuple[CoilState | str, ...]
    alarms: tuple[Alarm, ...]
    last_defect: dict[str, str]


class _SentStates:
    """The open coils' states of the last answer, on either side of the pipe: a state crosses it whole only when
    it changed. A dense coil's state (hundreds of periodic defects) changes a few times a minute (:data:`BUDGET`)
    but is answered four times a second, and unpickling it took the serving process a millisecond each time."""

    def __init__(self) -> None:
        self._states: dict[str, CoilState] = {}

    def pack(self, result: WatchResult) -> _Answer:
        """The answer to send (the watch's process)."""
        states = tuple(s.coil_id if self._states.get(s.coil_id) is s else s for s in result.open_coils)
        self._states = {s.coil_id: s for s in result.open_coils}
        return _Answer(states, result.alarms, result.last_defect)

    def unpack(self, answer: _Answer) -> WatchResult:
        """The result again (the serving process), the unchanged states those of the last answer."""
        states = tuple(self._states[s] if isinstance(s, str) else s for s in answer.open_coils)
        self._states = {s.coil_id: s for s in states}
        return WatchResult(states, answer.alarms, answer.last_defect)


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


def live_span_mm(line: Line, rules: Sequence[AlarmRule]) -> float:
    """The live window's length (:data:`LIVE_TURNS`, and at least every density rule's window)."""
    return max([LIVE_TURNS * max_period_mm(line, LIVE_PERIODIC)]
               + [r.window_m * 1000 for r in rules if r.kind == "density"])


class CoilWatch:
    """Open coils' live records, periodic defects, grades so far and alarms (see the module's doc)."""

    def __init__(self, line: Line, rules: Sequence[AlarmRule], grader: Grader | None = None,
                 budget: float = BUDGET) -> None:
        self.line, self.rules, self.grader, self.budget = line, tuple(rules), grader, budget
        self.span_mm = live_span_mm(line, self.rules)
        self._coils: dict[str, _OpenCoil] = {}
        self._closed: dict[str, None] = {}  # insertion-ordered: the oldest forgotten first

    def work(self, frames: Sequence[FrameComponents], closed: Sequence[str], now: float) -> WatchResult:
        """Forgets the ``closed`` coils, takes ``frames``, re-evaluates the coils that changed and are due."""
        for coil_id in closed:
            self._coils.pop(coil_id, None)
            self._closed[coil_id] = None
        while len(self._closed) > CLOSED_KEPT:
            del self._closed[next(iter(self._closed))]
        last_defect = self._add_frames(frames)
        for coil_id in [c for c, coil in self._coils.items() if time.monotonic() - coil.last_frame_at > STALE_S]:
            del self._coils[coil_id]
        alarms: list[Alarm] = []
        for coil_id, coil in self._coils.items():
            if coil.dirty and time.monotonic() >= coil.next_at:
                started = time.monotonic()
                coil.dirty = False
                coil.state = self._evaluate_coil(coil_id, coil, now, alarms)
                # a long coil's evaluation takes a while: wait BUDGET times as long before the next one
                coil.next_at = started + self.budget * (time.monotonic() - started)
        states = tuple(c.state for c in self._coils.values() if c.state is not None)
        return WatchResult(states, tuple(alarms), last_defect)

    def _add_frames(self, frames: Sequence[FrameComponents]) -> dict[str, str]:
        last_defect: dict[str, str] = {}
        taken: dict[str, list[tuple[FrameComponents, float]]] = {}  # per coil: its frames and their far ends
        for frame in frames:
            coil_id = frame.key.coil_id
            if coil_id in self._closed:
                continue  # a late frame of a closed coil: not taken for a new one
            far_end_mm = frame.position_mm + self.line.camera(frame.key.camera_id).frame_length_mm  # KeyError first
            taken.setdefault(coil_id, []).append((frame, far_end_mm))
            if frame.components:
                c = frame.components[0]
                last_defect[frame.key.camera_id] = (
                    f"class {c.class_id} at {c.along_start_mm / 1000:.3f} m, {c.across_start_mm:.0f} mm across "
                    f"on coil {coil_id}")
        for coil_id, coil_frames in taken.items():
            coil = self._coils.get(coil_id)
            if coil is None:
                coil = self._coils[coil_id] = _OpenCoil(RecordBuilder(self.line), CoilAlarms(self.rules, coil_id))
            # one call for all of a coil's frames: the merge's numpy work once, not once per frame
            added = coil.builder.add_frames([(frame.key, frame.components) for frame, _ in coil_frames])
            for (_, far_end_mm), new in zip(coil_frames, added):
                if new:
                    coil.last_frame_at = time.monotonic()
                    coil.frames += 1
                    coil.far_end_mm = max(coil.far_end_mm, far_end_mm)
                    coil.dirty = True
        return last_defect

    def _evaluate_coil(self, coil_id: str, coil: _OpenCoil, now: float, alarms: list[Alarm]) -> CoilState:
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
        alarms += coil.alarms.evaluate(recent, found, now)  # the finds' record numbers are in ``recent``
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


class WatchDied(RuntimeError):
    """The watch process ended, or gave no answer in :data:`ANSWER_TIMEOUT_S`."""


class WatchProcess:
    """A :class:`CoilWatch` in a process of its own (spawned, idle priority: :func:`lower_priority`); same :meth:`work`.

    One call at a time (the monitor's thread): the frames go over a pipe (:class:`server.watch_wire.WatchFrames`),
    the answer comes back (the open coils' states that changed since the last answer, whole).
    """

    def __init__(self, line: Line, rules: Sequence[AlarmRule], grader: Grader | None = None,
                 budget: float = BUDGET, nice: int = NICE) -> None:
        context = multiprocessing.get_context("spawn")  # the server's threads make fork unsafe
        self._conn, child = context.Pipe()
        self._process = context.Process(target=serve_watch, args=(child, line, tuple(rules), grader, budget, nice),
                                        name="line-watch", daemon=True)
        self._process.start()
        child.close()
        self._states = _SentStates()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def work(self, frames: Sequence[FrameComponents], closed: Sequence[str], now: float) -> WatchResult:
        """:meth:`CoilWatch.work` in the watch process; :class:`WatchDied` when it cannot answer."""
        try:
            self._conn.send((WatchFrames.of(frames), list(closed), now))
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            while not self._conn.poll(0.5):
                if not self._process.is_alive():
                    raise WatchDied(f"the line watch process ended (exit code {self._process.exitcode})")
                if time.monotonic() > deadline:
                    raise WatchDied(f"the line watch process gave no answer in {ANSWER_TIMEOUT_S:.0f} s")
            answer = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise WatchDied(f"the line watch process is gone: {exc}") from exc
        if isinstance(answer, BaseException):
            raise answer
        return self._states.unpack(answer)

    def close(self) -> None:
        """Asks the process to end; kills it if it does not within 5 s."""
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._conn.close()


def lower_priority(nice: int = NICE) -> None:
    """Puts the calling process in Linux's idle scheduling class, else raises its niceness by ``nice``.

    Why the idle class: a niceness of 19 still has a weight (15 against a serving thread's 1024) and
    the wake-up preemption of a normal task, so at saturation the watch took some of inference's time;
    a ``SCHED_IDLE`` task runs only where no normal task is runnable and any waking one preempts it.
    Unprivileged processes may enter it (Linux >= 2.6.39). ``nice`` 0 leaves the priority as it is.
    """
    if not nice:
        return
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError as exc:
            log.warning("event=line_watch_priority: no idle scheduling class (%s); niceness +%d instead", exc, nice)
    os.nice(nice)


def serve_watch(conn: Connection, line: Line, rules: tuple[AlarmRule, ...], grader: Grader | None,
                budget: float, nice: int) -> None:
    """The watch process: answers each ``(WatchFrames, closed, now)`` with a :class:`WatchResult` (or the error)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lower_priority(nice)
    gc.disable()  # collected once per call instead (below)
    periodic.warm_up()  # the first evaluation must not wait for a compilation
    watch = CoilWatch(line, rules, grader, budget)
    states = _SentStates()
    calls = 0
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        calls += 1
        try:
            frames, closed, now = request
            answer: Any = states.pack(watch.work(frames.frames(), closed, now))
        except Exception as exc:  # noqa: BLE001 - the error goes back to the monitor, which logs it
            log.exception("event=line_watch_error")
            answer = RuntimeError(f"the line watch failed: {type(exc).__name__}: {exc}")
            calls = 0  # a traceback holds cycles: collected below
        conn.send(answer)
        # The open coils' records live as long as their coils: taken out of the cyclic collector's scans,
        # which otherwise walk them again and again (60 % of unpickling a dense coil's frames). They are
        # still freed by reference counting when their coil closes (they hold no cycles). Cycles are
        # collected among the objects of one call in COLLECT_EVERY, and of a call that failed.
        if calls % COLLECT_EVERY == 0:
            gc.collect(1)
        gc.freeze()


__all__ = ["BUDGET", "CoilState", "CoilWatch", "WatchDied", "WatchProcess", "WatchResult", "live_span_mm",
           "lower_priority"]
