"""What the line acts on per coil (:class:`CoilVerdict`): its periodic defects and its grade.

Made from a coil's records (:func:`judge`): once at close, when the store keeps it in the coil's row
(columns ``periodic``, ``grade``, ``grade_rule``), and on read for an open coil (the grade so far).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from coils.line import Line
from coils.periodic import PeriodicConfig, PeriodicDefect, find_periodic
from coils.records import DefectRecord
from coils.summary import CoilSummary

#: Grades a coil: ``(summary, records, periodic defects) -> (grade, the rule that decided it)``.
Grader = Callable[[CoilSummary, Sequence[DefectRecord], Sequence[PeriodicDefect]], tuple[str, str]]


@dataclass(frozen=True)
class CoilVerdict:
    """A coil's periodic defects and grade; ``grade`` and ``grade_rule`` are "" where no grading was set."""

    periodic: tuple[PeriodicDefect, ...] = ()
    grade: str = ""
    grade_rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"periodic": [p.to_dict() for p in self.periodic], "grade": self.grade, "grade_rule": self.grade_rule}

    def describe(self) -> str:
        """As text: the grade and its rule, then one line per periodic defect."""
        lines = [f"grade {self.grade} by rule {self.grade_rule!r}" if self.grade else "grade: none (no grading rules)"]
        for p in self.periodic:
            roll = f", roll {p.roll}" if p.roll else ", no roll matches"
            lines.append(f"periodic: class {p.class_id} every {p.period_mm:.1f} mm at {p.across_start_mm:.0f}.."
                         f"{p.across_end_mm:.0f} mm across, {p.count}x from {p.first_mm / 1000:.3f} m to "
                         f"{p.last_mm / 1000:.3f} m{roll} (confidence {p.confidence:.4f})")
        return "\n".join(lines)

    def columns(self) -> dict[str, Any]:
        """The coil row's columns that keep it."""
        return {"periodic": json.dumps([p.to_dict() for p in self.periodic]), "grade": self.grade,
                "grade_rule": self.grade_rule}

    @classmethod
    def from_row(cls, row: Any) -> CoilVerdict | None:
        """The verdict kept in a coil row; None when the row has none (open, or closed before revision 0003)."""
        if row.periodic is None:
            return None
        return cls(tuple(PeriodicDefect.from_dict(p) for p in json.loads(row.periodic)), row.grade or "",
                   row.grade_rule or "")


def judge(line: Line, summary: CoilSummary, records: Sequence[DefectRecord], grader: Grader | None,
          config: PeriodicConfig | None = None, periodic: Sequence[PeriodicDefect] | None = None) -> CoilVerdict:
    """The coil's periodic defects (``periodic`` when already found), and its grade by ``grader`` (none without one)."""
    periodic = tuple(find_periodic(line, records, config) if periodic is None else periodic)
    if grader is None:
        return CoilVerdict(periodic)
    grade, rule = grader(summary, records, periodic)
    return CoilVerdict(periodic, grade, rule)


__all__ = ["CoilVerdict", "Grader", "judge"]
