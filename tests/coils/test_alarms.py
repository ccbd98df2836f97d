"""Alarm rules: parsed strictly (the key named), evaluated over a coil's records once per finding,
kept in the coil database with their acknowledgement."""

from __future__ import annotations

import pytest

from coils.alarm_store import AlarmStore
from coils.alarms import Alarm, CoilAlarms, parse_alarms
from coils.grading import RuleError
from coils.periodic import PeriodicDefect
from coils.records import DefectRecord
from coils.store import CoilStore
from tests.coils.test_records import two_cameras
from tests.coils.test_store import store_url  # noqa: F401  (the SQLite and PostgreSQL stores)

NAMES = ("pit", "inclusion", "scratch", "patch")
RULES = [
    {"name": "long-scratch", "kind": "defect_size", "class": "scratch", "min_length_mm": 100, "severity": 700},
    {"name": "pit-cluster", "kind": "density", "class": "pit", "count": 3, "window_m": 1},
    {"name": "roll-mark", "kind": "periodic", "severity": 800},
    {"name": "drift", "kind": "drift", "severity": 400},
    {"name": "down", "kind": "not_serving", "after_s": 5},
]


def record(class_id: int, along: float, length: float = 2.0, camera: str = "cam1") -> DefectRecord:
    return DefectRecord("C", class_id, along, along + length, 300.0, 302.0, 4.0, None, ((camera, int(along)),),
                        (camera,))


def test_coil_rules_raise_each_finding_once_naming_coil_position_and_camera() -> None:
    rules = parse_alarms(RULES, NAMES)
    assert [(r.name, r.kind, r.severity, r.class_id) for r in rules] == [
        ("long-scratch", "defect_size", 700, 3), ("pit-cluster", "density", 500, 1), ("roll-mark", "periodic", 800, 0),
        ("drift", "drift", 400, 0), ("down", "not_serving", 500, 0)]
    alarms = CoilAlarms(rules, "C")
    records = [record(3, 1000.0, 80.0), record(1, 5000.0), record(1, 5600.0)]
    assert alarms.evaluate(records, (), 1.0) == []
    records += [record(3, 2000.0, 150.0), record(1, 5900.0)]
    raised = alarms.evaluate(records, (), 2.0)
    assert [(a.rule, a.position_mm, a.camera_id) for a in raised] == [("long-scratch", 2000.0, "cam1"),
                                                                     ("pit-cluster", 5000.0, "cam1")]
    assert raised[0].message == ("long-scratch: class 3 defect 150 mm long on coil C at 2.000 m, 300 mm across, "
                                 "camera cam1")
    assert alarms.evaluate(records + [record(1, 5950.0)], (), 3.0) == []  # raised once per coil
    mark = PeriodicDefect(1, 300.0, 302.0, 1885.0, 0.999, 5001.0, 9000.0, 4, "work-roll", (1, 2))
    [periodic] = alarms.evaluate(records, (mark,), 4.0)
    assert periodic.rule == "roll-mark" and periodic.severity == 800 and "(roll work-roll)" in periodic.message
    assert alarms.evaluate(records, (mark,), 5.0) == []


@pytest.mark.parametrize(("entry", "named"), [
    ({"name": "a", "kind": "size"}, "alarms[0] (a).kind: unknown kind 'size'"),
    ({"name": "a", "kind": "defect_size", "class": "rust", "min_area_mm2": 1}, "unknown class 'rust'"),
    ({"name": "a", "kind": "density", "class": "pit", "count": 3}, "a density alarm needs count >= 1 and window_m"),
    ({"name": "a", "kind": "drift", "window_m": 3}, "alarms[0] (a).window_m: unknown key for a drift alarm"),
    ({"name": "a", "kind": "periodic", "severity": 2000}, "alarms[0] (a).severity: expected a number"),
    ({"name": "a", "kind": "defect_size"}, "needs min_length_mm or min_area_mm2"),
])
def test_a_wrong_alarm_rule_is_refused_naming_the_key(entry, named) -> None:
    with pytest.raises(RuleError, match=named.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        parse_alarms([entry], NAMES)


def test_alarms_are_stored_and_acknowledged_once(store_url) -> None:  # noqa: F811
    store = CoilStore.open(store_url, two_cameras())
    try:
        alarms = AlarmStore(store)
        first = alarms.add(Alarm(0, "roll-mark", "periodic", 800, "C", "cam0", 12.5, "m1", 100.0))
        second = alarms.add(Alarm(0, "drift", "drift", 400, "", "cam1", None, "m2", 101.0))
        assert first.alarm_id != second.alarm_id and first.alarm_id > 0
        acked = alarms.acknowledge(first.alarm_id, "opcua:operator", 150.0)
        assert (acked.acknowledged_unix_s, acked.acknowledged_by) == (150.0, "opcua:operator")
        again = alarms.acknowledge(first.alarm_id, "console", 160.0)
        assert again.acknowledged_by == "opcua:operator"  # the first acknowledgement counts
        assert [a.alarm_id for a in alarms.recent(10)] == [second.alarm_id, first.alarm_id]
        assert alarms.recent(10)[1] == acked
        with pytest.raises(KeyError):
            alarms.acknowledge(9999, "x", 1.0)
        assert alarms.for_coil("C") == [acked] and alarms.for_coil("other") == []
    finally:
        store.close()


def test_the_alarms_of_one_evaluation_are_stored_together_each_with_its_own_id(store_url) -> None:  # noqa: F811
    from server.line_monitor import AlarmBook

    store = CoilStore.open(store_url, two_cameras())
    try:
        book = AlarmBook(None, AlarmStore(store))
        seen = []
        book.listeners.append(seen.append)
        raised = book.raise_alarms([Alarm(0, "roll-mark", "periodic", 800, "C", f"cam{n}", 10.0 * n, f"m{n}", 100.0 + n)
                                    for n in range(3)])
        ids = [a.alarm_id for a in raised]
        assert len(set(ids)) == 3 and min(ids) > 0 and seen == raised
        assert [a.message for a in AlarmStore(store).for_coil("C")] == ["m0", "m1", "m2"]
        assert book.raise_alarms([]) == [] and [a.alarm_id for a in book.active()] == ids
    finally:
        store.close()
