"""The line monitor: an open coil's frames (as the coil tracker hands them over) raise the roll-mark
alarm once, the snapshot carries the coil so far and its grade; server rules raise on a change of
state; the alarm book counts, keeps and acknowledges."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import signal
import time

from prometheus_client import generate_latest

from coils.alarms import parse_alarms
from coils.line import Roll
from server.coil_watch import NICE
from server.line_monitor import AlarmBook, LineMonitor
from server.metrics import ServerMetrics
from tests.coils.test_records import two_cameras
from tests.coils.test_verdict import PERIOD, roll_mark_frames

RULES = [{"name": "roll-mark", "kind": "periodic", "class": 1, "severity": 800},
         {"name": "drift", "kind": "drift", "severity": 300},
         {"name": "down", "kind": "not_serving", "after_s": 0}]
NAMES = ("pit", "inclusion", "scratch", "patch")


def grade(summary, records, periodic) -> tuple[str, str]:
    return ("B", "B: not A: periodic") if periodic else ("A", "A: every condition holds")


def test_a_roll_mark_raises_one_alarm_and_the_snapshot_follows_the_coil() -> None:
    line = dataclasses.replace(two_cameras(), rolls=(Roll("work-roll", PERIOD / math.pi),))
    metrics = ServerMetrics()
    book = AlarmBook(metrics)
    heard = []
    book.listeners.append(heard.append)
    monitor = LineMonitor(line, parse_alarms(RULES, NAMES), book, grade, budget=0)
    frames = roll_mark_frames(line)
    monitor.on_frames(frames[:8])  # camera 0's first 160 mm: two turns, no repeat yet
    monitor.evaluate()
    [coil] = monitor.snapshot().open_coils
    assert (coil.coil_id, coil.frames, coil.length_mm, coil.grade, coil.periodic) == ("R1", 8, 160.0, "A", ())
    monitor.on_frames(frames[8:])
    monitor.evaluate()
    monitor.on_frames(frames[:4])  # a resend: nothing new
    monitor.evaluate()
    [coil] = monitor.snapshot().open_coils
    assert coil.frames == len(frames) and coil.grade == "B" and [p.roll for p in coil.periodic] == ["work-roll"]
    assert coil.length_mm == 1200.0 and coil.defects_per_class[1] == 12
    [alarm] = book.recent()
    assert alarm.rule == "roll-mark" and alarm.coil_id == "R1" and alarm.alarm_id < 0 and heard == [alarm]
    assert "repeats every 100 mm (roll work-roll), 12x" in alarm.message
    text = generate_latest(metrics.registry).decode()
    assert 'inspection_alarms_raised_total{rule="roll-mark"} 1.0' in text
    assert "inspection_alarms_unacknowledged 1.0" in text
    acked = book.acknowledge(alarm.alarm_id, "console")
    assert acked.acknowledged and book.active() == [] and heard[-1] == acked
    assert "inspection_alarms_unacknowledged 0.0" in generate_latest(metrics.registry).decode()


def test_a_coil_of_random_defects_only_raises_no_periodic_alarm() -> None:
    line = dataclasses.replace(two_cameras(), rolls=(Roll("work-roll", PERIOD / math.pi),))
    book = AlarmBook(None)
    monitor = LineMonitor(line, parse_alarms(RULES, NAMES), book, grade, budget=0)
    frames = roll_mark_frames(line, marks=False, random=200)  # about 3 random pits per frame pair
    for start in range(0, len(frames), 10):
        monitor.on_frames(frames[start:start + 10])
        monitor.evaluate()
    [coil] = monitor.snapshot().open_coils
    assert coil.frames == len(frames) and sum(coil.defects_per_class.values()) > 100
    assert (coil.periodic, coil.grade, book.recent()) == ((), "A", [])


def test_server_rules_raise_when_their_state_starts_and_rearm_when_it_ends() -> None:
    book = AlarmBook(None)
    monitor = LineMonitor(two_cameras(), parse_alarms(RULES, NAMES), book, interval_s=0.01)
    state = {"serving": True, "drift": {}}

    async def run() -> None:
        watch = asyncio.ensure_future(monitor.watch_server(lambda: state["serving"], lambda: state["drift"]))
        for serving, drift in ((True, {"cam0": ["mean"]}), (True, {"cam0": ["mean"]}), (False, {}), (True, {}),
                               (True, {"cam0": ["std"]})):
            state.update(serving=serving, drift=drift)
            await asyncio.sleep(0.05)
        watch.cancel()

    asyncio.run(run())
    assert [(a.rule, a.camera_id) for a in reversed(book.recent())] == [("drift", "cam0"), ("down", ""),
                                                                         ("drift", "cam0")]
    assert "camera cam0's images drifted (std over threshold)" in book.recent()[0].message


def shifted(frames, by_mm: float, first_id: int):
    """``frames`` ``by_mm`` further along the coil, under new frame ids."""
    moved = []
    for f in frames:
        key = dataclasses.replace(f.key, frame_id=f.key.frame_id + first_id)
        parts = tuple(dataclasses.replace(c, key=key, along_start_mm=c.along_start_mm + by_mm) for c in f.components)
        moved.append(dataclasses.replace(f, key=key, position_mm=f.position_mm + by_mm, components=parts))
    return moved


def test_the_live_search_follows_a_long_coil_and_keeps_what_slid_out_of_its_window() -> None:
    line = dataclasses.replace(two_cameras(), rolls=(Roll("work-roll", PERIOD / math.pi),))
    book = AlarmBook(None)
    monitor = LineMonitor(line, parse_alarms(RULES, NAMES), book, grade, budget=0)
    assert monitor.span_mm == 16 * 2 * PERIOD  # LIVE_TURNS of the longest period looked for
    for n, frames in enumerate((roll_mark_frames(line), roll_mark_frames(line, marks=False),
                                roll_mark_frames(line))):
        monitor.on_frames(shifted(frames, n * 3 * monitor.span_mm, n * 1000))
        monitor.evaluate()
        [coil] = monitor.snapshot().open_coils
        [mark] = coil.periodic  # the head's mark kept after the window slid past it
        assert mark.first_mm < 1200 if n < 2 else mark.first_mm > 6 * monitor.span_mm
        assert coil.grade == "B" and coil.defects_per_class[1] == 12 * (1 if n < 2 else 2)
    assert [a.rule for a in book.recent()] == ["roll-mark"]  # the same roll at the same place: raised once


def wait_for(check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout_s} s")


def test_started_the_watch_runs_in_a_process_of_its_own_and_one_that_dies_is_replaced() -> None:
    line = dataclasses.replace(two_cameras(), rolls=(Roll("work-roll", PERIOD / math.pi),))
    book = AlarmBook(None)
    monitor = LineMonitor(line, parse_alarms(RULES, NAMES), book, grade, interval_s=0.02)
    monitor.start()
    try:
        first = monitor._watch.pid
        assert first not in (None, os.getpid())
        # only on cycles no serving thread wants: Linux's idle class (else the lowest niceness)
        if hasattr(os, "SCHED_IDLE"):
            wait_for(lambda: os.sched_getscheduler(first) == os.SCHED_IDLE)
            assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the serving process keeps its own
        else:
            lower = min(os.getpriority(os.PRIO_PROCESS, 0) + NICE, 19)
            wait_for(lambda: os.getpriority(os.PRIO_PROCESS, first) == lower)
        frames = roll_mark_frames(line)
        monitor.on_frames(frames)
        [alarm] = wait_for(book.recent)
        assert alarm.rule == "roll-mark" and alarm.coil_id == "R1" and "12x" in alarm.message
        coil = wait_for(lambda: monitor.snapshot().open_coils)[0]
        assert coil.frames == len(frames) and coil.grade == "B" and [p.roll for p in coil.periodic] == ["work-roll"]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: monitor._watch.pid != first)  # replaced; the open coil's live view starts over
        monitor.on_frames(shifted(frames, 0, 1000))  # the same marks under new frame ids: found again
        wait_for(lambda: len(book.recent()) == 2)
        assert [a.rule for a in book.recent()] == ["roll-mark", "roll-mark"]
    finally:
        monitor.close()
    assert not monitor._thread.is_alive()


def test_frames_past_the_pending_bound_are_left_out_of_the_live_view_and_counted() -> None:
    line = dataclasses.replace(two_cameras(), rolls=(Roll("work-roll", PERIOD / math.pi),))
    metrics = ServerMetrics()
    frames = roll_mark_frames(line)
    monitor = LineMonitor(line, parse_alarms(RULES, NAMES), AlarmBook(metrics), grade, budget=0, metrics=metrics,
                          max_pending=sum(len(f.components) for f in frames[8:]))
    monitor.on_frames(frames[8:])
    monitor.on_frames(frames[:8])  # the watch has not taken the first ones yet: over the bound
    monitor.evaluate()
    [coil] = monitor.snapshot().open_coils
    assert coil.frames == len(frames) - 8
    assert "inspection_line_watch_shed_frames_total 8.0" in generate_latest(metrics.registry).decode()
    monitor.on_frames(frames[:8])  # taken: room again
    monitor.evaluate()
    [coil] = monitor.snapshot().open_coils
    assert coil.frames == len(frames) and [p.roll for p in coil.periodic] == ["work-roll"]


def test_a_calls_frames_of_two_coils_at_once_give_what_one_frame_a_call_gives() -> None:
    """The watch merges a call's frames of each coil together (RecordBuilder.add_frames): interleaved coils, a
    resend inside the call and a closed coil's late frame change nothing against one frame per call."""
    from server.coil_watch import CoilWatch

    line = dataclasses.replace(two_cameras(), rolls=(Roll("work-roll", PERIOD / math.pi),))
    rules = parse_alarms(RULES, NAMES)
    first, second = roll_mark_frames(line, "R1"), roll_mark_frames(line, "R2", random=40)
    mixed = [f for pair in zip(first, second) for f in pair] + first[:3] + roll_mark_frames(line, "R0")[:2]
    together, alone = CoilWatch(line, rules, grade, budget=0), CoilWatch(line, rules, grade, budget=0)
    together.work([], ["R0"], 0.0)
    alone.work([], ["R0"], 0.0)
    batched = together.work(mixed, [], 0.0)
    last_defect: dict[str, str] = {}
    for frame in mixed:
        last = alone.work([frame], [], 0.0)
        last_defect.update(last.last_defect)
    # the live periodic finds depend on when the coil was evaluated (here once against every frame): not compared
    def facts(result) -> list[tuple]:
        return [(c.coil_id, c.length_mm, c.frames, c.defects_per_class) for c in result.open_coils]

    assert facts(batched) == facts(last) and [c.coil_id for c in batched.open_coils] == ["R1", "R2"]
    assert batched.open_coils[0].frames == len(first) and batched.last_defect == last_defect
    assert [p.roll for p in batched.open_coils[0].periodic] == ["work-roll"]
    for coil_id in ("R1", "R2"):
        assert together._coils[coil_id].builder.records(coil_id) == alone._coils[coil_id].builder.records(coil_id)
