"""Live alarms: the rules of a rule file's ``alarms:`` and their evaluation over an open coil's records.

```yaml
alarms:
  - {name: long-scratch, kind: defect_size, class: scratch, min_length_mm: 100, severity: 700}
  - {name: big-patch, kind: defect_size, class: all, min_area_mm2: 2000, severity: 500}
  - {name: pit-cluster, kind: density, class: pit, count: 10, window_m: 5, severity: 600}
  - {name: roll-mark, kind: periodic, class: all, severity: 800}
  - {name: drift, kind: drift, severity: 400}               # a camera's drift over its threshold
  - {name: not-serving, kind: not_serving, after_s: 10, severity: 900}
```

``severity`` is OPC UA's, 1 (lowest) to 1000. :class:`CoilAlarms` evaluates the coil rules over one
coil's records as they grow and raises each finding once per coil (a defect once, a density once,
a periodic defect once per class and band); the server rules (``drift``, ``not_serving``) are the
server's (:mod:`server.line_monitor`). An :class:`Alarm` names the coil, the position and the camera.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from coils.grading import RuleError, class_id, number, read_rules
from coils.line import Line
from coils.periodic import PeriodicDefect
from coils.records import DefectRecord

COIL_KINDS = ("defect_size", "density", "periodic")
SERVER_KINDS = ("drift", "not_serving")
_KEYS = {"defect_size": ("class", "min_length_mm", "min_area_mm2"), "density": ("class", "count", "window_m"),
         "periodic": ("class",), "drift": (), "not_serving": ("after_s",)}


@dataclass(frozen=True)
class AlarmRule:
    """One alarm rule; the fields its kind does not use stay 0."""

    name: str
    kind: str
    severity: int
    class_id: int = 0  # 0: every class
    class_label: str = "all"
    min_length_mm: float = 0.0
    min_area_mm2: float = 0.0
    count: int = 0
    window_m: float = 0.0
    after_s: float = 0.0


@dataclass(frozen=True)
class Alarm:
    """One raised alarm; ``alarm_id`` 0 until the alarm book has kept it."""

    alarm_id: int
    rule: str
    kind: str
    severity: int
    coil_id: str
    camera_id: str
    position_mm: float | None
    message: str
    raised_unix_s: float
    acknowledged_unix_s: float | None = None
    acknowledged_by: str = ""

    @property
    def acknowledged(self) -> bool:
        return self.acknowledged_unix_s is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the console's, the store's columns)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def acknowledge(self, by: str, at_unix_s: float) -> Alarm:
        return replace(self, acknowledged_unix_s=at_unix_s, acknowledged_by=by)


def load_alarms(path: Path, line: Line, class_names: Sequence[str]) -> tuple[AlarmRule, ...]:
    """The rule file's ``alarms:`` (none when it has none); RuleError naming the key."""
    data = read_rules(path)
    return parse_alarms(data.get("alarms", []), class_names, str(path)) if "alarms" in data else ()


def parse_alarms(entries: Any, class_names: Sequence[str], where: str = "alarms") -> tuple[AlarmRule, ...]:
    """``alarms:`` as rules; RuleError naming the key (``FILE: alarms[2] (roll-mark).severity``)."""
    if not isinstance(entries, list):
        raise RuleError(f"{where}: alarms: expected a list of alarm rules")
    rules, names = [], set()
    for n, entry in enumerate(entries):
        key = f"{where}: alarms[{n}]"
        if not isinstance(entry, dict):
            raise RuleError(f"{key}: expected a mapping")
        name, kind = entry.get("name"), entry.get("kind")
        if not isinstance(name, str) or not name.strip() or name in names:
            raise RuleError(f"{key}.name: every alarm needs a name of its own, got {name!r}")
        names.add(name)
        key = f"{key} ({name})"
        if kind not in _KEYS:
            raise RuleError(f"{key}.kind: unknown kind {kind!r} (expected {', '.join(_KEYS)})")
        allowed = ("name", "kind", "severity", *_KEYS[kind])
        unknown = sorted(str(k) for k in set(entry) - set(allowed))
        if unknown:
            raise RuleError(f"{key}.{unknown[0]}: unknown key for a {kind} alarm (expected {', '.join(allowed)})")
        rules.append(_rule(entry, key, name, kind, class_names))
    return tuple(rules)


def _rule(entry: dict[str, Any], key: str, name: str, kind: str, class_names: Sequence[str]) -> AlarmRule:
    severity = number(entry.get("severity", 500), f"{key}.severity", lambda v: 1 <= v <= 1000 and v == int(v))
    k = class_id(entry.get("class", "all"), class_names, key) if "class" in _KEYS[kind] else 0
    values = {f: number(entry[f], f"{key}.{f}") for f in _KEYS[kind] if f != "class" and f in entry}
    rule = AlarmRule(name, kind, int(severity), k, class_names[k - 1] if k else "all",
                     **{f: (int(v) if f == "count" else v) for f, v in values.items()})
    if kind == "defect_size" and not (rule.min_length_mm or rule.min_area_mm2):
        raise RuleError(f"{key}: a defect_size alarm needs min_length_mm or min_area_mm2")
    if kind == "density" and not (rule.count >= 1 and rule.window_m > 0):
        raise RuleError(f"{key}: a density alarm needs count >= 1 and window_m > 0")
    return rule


class CoilAlarms:
    """The coil rules over one coil's records as they grow; each finding raised once (see the module's doc)."""

    def __init__(self, rules: Sequence[AlarmRule], coil_id: str) -> None:
        self.rules = [r for r in rules if r.kind in COIL_KINDS]
        self.coil_id = coil_id
        self._raised: set[Hashable] = set()

    def evaluate(self, records: Sequence[DefectRecord], periodic: Sequence[PeriodicDefect],
                 now_unix_s: float) -> list[Alarm]:
        """The alarms the records raise now that were not raised before (``alarm_id`` 0)."""
        found: list[Alarm] = []
        for rule in self.rules:
            if rule.kind == "defect_size":
                found += self._sizes(rule, records, now_unix_s)
            elif rule.kind == "density":
                found += self._density(rule, records, now_unix_s)
            else:
                found += self._periodic(rule, records, periodic, now_unix_s)
        return found

    def _new(self, key: Hashable) -> bool:
        if key in self._raised:
            return False
        self._raised.add(key)
        return True

    def _alarm(self, rule: AlarmRule, record: DefectRecord, text: str, now: float) -> Alarm:
        camera = record.cameras[0] if record.cameras else ""
        message = (f"{rule.name}: {text} on coil {self.coil_id} at {record.along_start_mm / 1000:.3f} m, "
                   f"{record.across_start_mm:.0f} mm across, camera {camera or '?'}")
        return Alarm(0, rule.name, rule.kind, rule.severity, self.coil_id, camera, record.along_start_mm, message, now)

    def _sizes(self, rule: AlarmRule, records: Sequence[DefectRecord], now: float) -> list[Alarm]:
        found = []
        for r in records:
            if rule.class_id not in (0, r.class_id):
                continue
            too_long = rule.min_length_mm and r.length_mm > rule.min_length_mm
            too_large = rule.min_area_mm2 and r.area_mm2 > rule.min_area_mm2
            if (too_long or too_large) and self._new((rule.name, r.class_id, r.frames[:1] or r.along_start_mm)):
                size = f"{r.length_mm:.0f} mm long" if too_long else f"{r.area_mm2:.0f} mm2"
                found.append(self._alarm(rule, r, f"class {r.class_id} defect {size}", now))
        return found

    def _density(self, rule: AlarmRule, records: Sequence[DefectRecord], now: float) -> list[Alarm]:
        chosen = sorted((r for r in records if rule.class_id in (0, r.class_id)), key=lambda r: r.along_start_mm)
        window, first = rule.window_m * 1000, 0
        for last, record in enumerate(chosen):
            while record.along_start_mm - chosen[first].along_start_mm > window:
                first += 1
            if last - first + 1 >= rule.count and self._new((rule.name,)):
                text = f"{last - first + 1} {rule.class_label} defects within {rule.window_m:g} m"
                return [self._alarm(rule, chosen[first], text, now)]
        return []

    def _periodic(self, rule: AlarmRule, records: Sequence[DefectRecord], periodic: Sequence[PeriodicDefect],
                  now: float) -> list[Alarm]:
        found = []
        for p in periodic:
            if rule.class_id not in (0, p.class_id) or not self._new((rule.name, p.class_id, p.roll,
                                                                      round(p.across_start_mm / 20))):
                continue
            roll = f" (roll {p.roll})" if p.roll else ""
            text = f"class {p.class_id} repeats every {p.period_mm:.0f} mm{roll}, {p.count}x"
            found.append(self._alarm(rule, records[p.records[0]], text, now))
        return found


__all__ = ["COIL_KINDS", "SERVER_KINDS", "Alarm", "AlarmRule", "CoilAlarms", "load_alarms", "parse_alarms"]
