"""Coil grades from a rule file: the first grade that holds, with the rule that decided it; a coil
re-graded by another file; wrong files refused naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from coils.grading import UNGRADED, RuleError, load_grading
from coils.line import Line
from coils.periodic import PeriodicDefect
from coils.records import DefectRecord
from coils.summary import CoilFacts, summarise

NAMES = ("pit", "inclusion", "scratch", "patch")
LINE = Line("l", 1000.0, (), ())

MILL = """
grades:
  - name: A
    max_per_100m: {pit: 3}
    max_length_mm: {scratch: 50}
    max_periodic: {all: 0}
    zones:
      - {name: edges, edge_mm: 20, max_count: {all: 0}}
  - name: B
    max_per_100m: {pit: 10}
    zones:
      - {name: head, head_m: 5, max_count: {all: 2}}
  - name: reject
"""
CUSTOMER = """
grades:
  - name: prime
    max_count: {all: 20}
    zones:
      - {name: centre, across_mm: [400, 600], max_area_mm2: {inclusion: 10}}
  - name: second
    max_count: {1: 50}
"""


def record(class_id: int, along: float, across: float, length: float = 2.0, area: float = 4.0) -> DefectRecord:
    return DefectRecord("C", class_id, along, along + length, across, across + 2.0, area, None, (), ())


def coil(records: list[DefectRecord], length_mm: float = 100_000.0):
    return summarise(CoilFacts("C", "closed", 0.0, 1.0, 2.0, "end", length_mm, 10, 0), records)


def rules(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_first_grade_that_holds_and_the_rule_that_decided_it(tmp_path) -> None:
    grading = load_grading(rules(tmp_path, MILL), LINE, NAMES)
    clean = [record(1, 10_000.0 * k, 500.0) for k in range(3)]  # 3 pits per 100 m
    assert grading.grade(coil(clean), clean, ()) == ("A", "A: every condition holds")
    pits = [record(1, 9_000.0 * k + 6_000, 500.0) for k in range(6)]
    assert grading.grade(coil(pits), pits, ()) == ("B", "B: not A: pit 6 per 100 m > 3")
    edge = clean + [record(2, 50_000.0, 985.0)]
    assert grading.grade(coil(edge), edge, ()) == ("B", "B: not A: edges: all 1 defects > 0")
    long = clean + [record(3, 50_000.0, 500.0, length=80.0)]
    assert grading.grade(coil(long), long, ()) == ("B", "B: not A: scratch 80 mm long > 50")
    mark = PeriodicDefect(1, 1.0, 3.0, 1885.0, 0.99, 0.0, 9000.0, 5, "work-roll", (0, 1, 2))
    assert grading.grade(coil(clean), clean, (mark,)) == ("B", "B: not A: all 1 periodic > 0")
    head = pits + [record(4, 100.0 * k, 500.0) for k in range(3)]
    assert grading.grade(coil(head), head, ()) == ("reject", "reject: not B: head: all 3 defects > 2")


def test_a_coil_regraded_by_another_file_names_the_other_rule(tmp_path) -> None:
    mill = load_grading(rules(tmp_path, MILL), LINE, NAMES)
    customer = load_grading(rules(tmp_path, CUSTOMER, "customer.yaml"), LINE, NAMES)
    records = [record(1, 9_000.0 * k, 100.0) for k in range(6)] + [record(2, 500.0, 480.0, area=30.0)]
    assert mill.grade(coil(records), records, ()) == ("B", "B: not A: pit 6 per 100 m > 3")
    assert customer.grade(coil(records), records, ()) == ("second", "second: not prime: centre: inclusion 30 mm2 > 10")
    many = [record(1, 100.0 * k, 100.0) for k in range(60)]
    assert customer.grade(coil(many), many, ()) == (UNGRADED, "no grade holds; last: second: pit 60 defects > 50")


@pytest.mark.parametrize(("text", "named"), [
    ("grades:\n  - {name: A, max_count: {rust: 1}}\n", "grades[0] (A).max_count.rust: unknown class 'rust'"),
    ("grades:\n  - {name: A, max_count: {7: 1}}\n", "grades[0] (A).max_count.7: unknown class 7"),
    ("grades:\n  - {name: A, max_cuont: {all: 1}}\n", "grades[0].max_cuont: unknown key"),
    ("grades:\n  - {name: A, zones: [{edge_mm: 600, max_count: {all: 0}}]}\n",
     "grades[0] (A).zones[0].edge_mm: edge bands of 600 mm are wider than the strip (1000 mm)"),
    ("grades:\n  - {name: A, zones: [{across_mm: [900, 1200], max_count: {all: 0}}]}\n",
     "grades[0] (A).zones[0].across_mm: the band [900.0, 1200.0] must lie within the strip"),
    ("grades:\n  - {name: A, zones: [{head_m: 5, tail_m: 5, max_count: {all: 0}}]}\n",
     "grades[0] (A).zones[0]: a zone needs exactly one of"),
    ("grades:\n  - {name: A, max_count: {all: many}}\n", "grades[0] (A).max_count.all: expected a number"),
    ("grades:\n  - {name: A}\n  - {name: A}\n", "grades[1].name: grade 'A' is given twice"),
    ("grade:\n  - {name: A}\n", "unknown key 'grade'"),
])
def test_a_wrong_rule_file_is_refused_naming_the_key(tmp_path, text, named) -> None:
    path = rules(tmp_path, text)
    with pytest.raises(RuleError) as caught:
        load_grading(path, LINE, NAMES)
    assert str(caught.value).startswith(str(path)) and named in str(caught.value)
