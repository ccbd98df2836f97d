"""Coil grades from a rule file (``server serve --grading FILE``, ``grades:``): the first grade that holds.

```yaml
grades:                        # in order, best first: a coil gets the first grade whose conditions all hold
  - name: A
    max_per_100m: {pit: 3}     # per class (name, id or "all"): defects per 100 m of the coil, at most
    max_count: {scratch: 0}    # defects, at most
    max_length_mm: {all: 50}   # no defect longer along the strip than this
    max_area_mm2: {all: 400}   # no defect larger
    max_periodic: {all: 0}     # periodic defects (roll marks, coils.periodic), at most
    zones:                     # the same conditions (counts, length, area) over a part of the strip
      - {name: edges, edge_mm: 20, max_count: {all: 0}}      # within 20 mm of either edge
      - {name: head, head_m: 5, max_count: {all: 2}}          # the first 5 m (tail_m: the last)
      - {name: centre, across_mm: [600, 900], max_area_mm2: {all: 50}}
  - name: reject               # no conditions: always holds
```

The coil keeps its grade and **the rule that decided it**: ``"A: every condition holds"`` for the
first grade; for a later one, the grade above's first condition that failed, with the value
measured (``"B: not A: pit 5.2 per 100 m > 3"``). A file that is wrong is refused whole, naming
the key: an unknown key or class, a value that is not a number, a zone with no place or two, a
band wider than the strip. :mod:`coils.alarms` reads the same file's ``alarms:``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from coils.line import Line
from coils.periodic import PeriodicDefect
from coils.records import DefectRecord
from coils.summary import CoilSummary

#: The part of the rule file each module reads.
TOP_KEYS = ("grades", "alarms")
ALL = "all"
_COUNTED = ("max_count", "max_length_mm", "max_area_mm2")
_GRADE_KEYS = ("name", "max_per_100m", *_COUNTED, "max_periodic", "zones")
_ZONE_PLACES = ("edge_mm", "head_m", "tail_m", "across_mm")
_ZONE_KEYS = ("name", *_ZONE_PLACES, *_COUNTED)
UNGRADED = "ungraded"


class RuleError(ValueError):
    """A rule file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Limit:
    """One condition: ``measure`` of class ``class_id`` (0: all classes) at most ``limit``."""

    measure: str
    class_id: int
    limit: float
    label: str  # the class's name, or "all"

    def check(self, value: float, zone: str = "") -> str:
        """"" when ``value`` keeps the limit, else the failure as text."""
        if value <= self.limit:
            return ""
        where = f"{zone}: " if zone else ""
        unit = {"max_count": " defects", "max_per_100m": " per 100 m", "max_length_mm": " mm long",
                "max_area_mm2": " mm2", "max_periodic": " periodic"}[self.measure]
        return f"{where}{self.label} {value:g}{unit} > {self.limit:g}"


@dataclass(frozen=True)
class Zone:
    """A part of the strip: within ``edge_mm`` of an edge, the first/last metres, or an across band."""

    name: str
    place: str
    value: tuple[float, ...]
    limits: tuple[Limit, ...]

    def holds(self, record: DefectRecord, summary: CoilSummary, width_mm: float) -> bool:
        if self.place == "edge_mm":
            return record.across_start_mm < self.value[0] or record.across_end_mm > width_mm - self.value[0]
        if self.place == "head_m":
            return record.along_start_mm < self.value[0] * 1000
        if self.place == "tail_m":
            return record.along_end_mm > summary.length_mm - self.value[0] * 1000
        return record.across_end_mm > self.value[0] and record.across_start_mm < self.value[1]


@dataclass(frozen=True)
class Grade:
    name: str
    limits: tuple[Limit, ...]
    zones: tuple[Zone, ...]


@dataclass(frozen=True)
class Grading:
    """The grades of a rule file, in order; :meth:`grade` is a :data:`coils.verdict.Grader`."""

    grades: tuple[Grade, ...]
    strip_width_mm: float

    def grade(self, summary: CoilSummary, records: Sequence[DefectRecord],
              periodic: Sequence[PeriodicDefect]) -> tuple[str, str]:
        """(grade, the rule that decided it) of one coil."""
        failed = ""
        for grade in self.grades:
            failure = self.first_failure(grade, summary, records, periodic)
            if not failure:
                return grade.name, f"{grade.name}: " + (f"not {failed}" if failed else "every condition holds")
            failed = f"{grade.name}: {failure}"
        return UNGRADED, f"no grade holds; last: {failed}"

    def first_failure(self, grade: Grade, summary: CoilSummary, records: Sequence[DefectRecord],
                      periodic: Sequence[PeriodicDefect]) -> str:
        """The grade's first condition that fails, as text; "" when all hold."""
        for limit in grade.limits:
            if failure := limit.check(_measure(limit, summary, records, periodic)):
                return failure
        for zone in grade.zones:
            inside = [r for r in records if zone.holds(r, summary, self.strip_width_mm)]
            for limit in zone.limits:
                if failure := limit.check(_measure(limit, summary, inside, ()), zone.name):
                    return failure
        return ""


def _measure(limit: Limit, summary: CoilSummary, records: Sequence[DefectRecord],
             periodic: Sequence[PeriodicDefect]) -> float:
    def of_class(items: Sequence[Any]) -> list[Any]:
        return [r for r in items if limit.class_id in (0, r.class_id)]

    if limit.measure == "max_periodic":
        return float(len(of_class(periodic)))
    chosen = of_class(records)
    if limit.measure == "max_count":
        return float(len(chosen))
    if limit.measure == "max_per_100m":
        return round(len(chosen) / summary.length_mm * 1e5, 3) if summary.length_mm > 0 else 0.0
    if limit.measure == "max_length_mm":
        return max((r.length_mm for r in chosen), default=0.0)
    return max((r.area_mm2 for r in chosen), default=0.0)


# ---------------------------------------------------------------------------------------------- loading
def read_rules(path: Path) -> dict[str, Any]:
    """The rule file as a mapping; RuleError naming the file when it is not YAML or has unknown keys."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RuleError(f"{path}: cannot read the rule file: {exc}") from exc
    if not isinstance(data, dict):
        raise RuleError(f"{path}: expected a mapping with {' and/or '.join(TOP_KEYS)}")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise RuleError(f"{path}: unknown key {unknown[0]!r} (expected {', '.join(TOP_KEYS)})")
    return data


def load_grading(path: Path, line: Line, class_names: Sequence[str]) -> Grading | None:
    """The file's ``grades:`` checked against the line and the model's classes; None when it has none."""
    data = read_rules(path)
    if "grades" not in data:
        return None
    return parse_grading(data["grades"], line, class_names, str(path))


def parse_grading(grades: Any, line: Line, class_names: Sequence[str], where: str = "grading") -> Grading:
    """``grades:`` as :class:`Grading`; RuleError naming the key (``FILE: grades[1] (B).zones[0].edge_mm``)."""
    if not isinstance(grades, list) or not grades:
        raise RuleError(f"{where}: grades: expected a list of grades, best first")
    parsed, names = [], set()
    for n, entry in enumerate(grades):
        key = f"{where}: grades[{n}]"
        entry = _mapping(entry, key, _GRADE_KEYS)
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RuleError(f"{key}.name: every grade needs a name")
        if name in names:
            raise RuleError(f"{key}.name: grade {name!r} is given twice")
        names.add(name)
        key = f"{key} ({name})"
        limits = _limits(entry, key, class_names, ("max_per_100m", *_COUNTED, "max_periodic"))
        zones = entry.get("zones", [])
        if not isinstance(zones, list):
            raise RuleError(f"{key}.zones: expected a list of zones")
        parsed.append(Grade(name, limits, tuple(_zone(z, f"{key}.zones[{i}]", line, class_names)
                                                for i, z in enumerate(zones))))
    return Grading(tuple(parsed), line.strip_width_mm)


def _mapping(entry: Any, key: str, allowed: Sequence[str]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise RuleError(f"{key}: expected a mapping")
    unknown = sorted(str(k) for k in set(entry) - set(allowed))
    if unknown:
        raise RuleError(f"{key}.{unknown[0]}: unknown key (expected {', '.join(allowed)})")
    return entry


def _limits(entry: dict[str, Any], key: str, class_names: Sequence[str], measures: Sequence[str]) -> tuple[Limit, ...]:
    limits = []
    for measure in measures:
        if measure not in entry:
            continue
        per_class = entry[measure]
        if not isinstance(per_class, dict) or not per_class:
            raise RuleError(f"{key}.{measure}: expected a mapping of class (name, id or 'all') to a limit")
        for label, value in per_class.items():
            k = class_id(label, class_names, f"{key}.{measure}")
            limits.append(Limit(measure, k, number(value, f"{key}.{measure}.{label}"),
                                class_names[k - 1] if k else ALL))
    return tuple(limits)


def _zone(entry: Any, key: str, line: Line, class_names: Sequence[str]) -> Zone:
    entry = _mapping(entry, key, _ZONE_KEYS)
    name = str(entry.get("name", key.rsplit(".", 1)[-1]))
    places = [p for p in _ZONE_PLACES if p in entry]
    if len(places) != 1:
        raise RuleError(f"{key}: a zone needs exactly one of {', '.join(_ZONE_PLACES)}, got {places or 'none'}")
    place, width = places[0], line.strip_width_mm
    if place == "across_mm":
        band = entry[place]
        if not isinstance(band, list) or len(band) != 2:
            raise RuleError(f"{key}.across_mm: expected [from_mm, to_mm]")
        value = (number(band[0], f"{key}.across_mm[0]"), number(band[1], f"{key}.across_mm[1]"))
        if not value[0] < value[1] or value[1] > width:
            raise RuleError(f"{key}.across_mm: the band {list(value)} must lie within the strip (0..{width:g} mm)")
    else:
        value = (number(entry[place], f"{key}.{place}"),)
        if place == "edge_mm" and value[0] * 2 > width:
            raise RuleError(f"{key}.edge_mm: edge bands of {value[0]:g} mm are wider than the strip ({width:g} mm)")
    limits = _limits(entry, key, class_names, _COUNTED)
    if not limits:
        raise RuleError(f"{key}: a zone needs a condition ({', '.join(_COUNTED)})")
    return Zone(name, place, value, limits)


def class_id(label: Any, class_names: Sequence[str], key: str) -> int:
    """A class as a rule file names it (name, id or ``all`` -> 0); RuleError naming an unknown one."""
    if label == ALL:
        return 0
    if isinstance(label, int) and 1 <= label <= len(class_names):
        return label
    if isinstance(label, str) and label in class_names:
        return class_names.index(label) + 1
    known = ", ".join(f"{k + 1}/{n}" for k, n in enumerate(class_names))
    raise RuleError(f"{key}.{label}: unknown class {label!r} (the model's classes: {known}; or 'all')")


def number(value: Any, key: str, check: Callable[[float], bool] = lambda v: v >= 0) -> float:
    """A non-negative number; RuleError naming the key otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not check(float(value)):
        raise RuleError(f"{key}: expected a number >= 0, got {value!r}")
    return float(value)


__all__ = ["Grading", "RuleError", "UNGRADED", "class_id", "load_grading", "number", "parse_grading", "read_rules"]
