"""A coil's summary (:class:`CoilSummary`): its length, defects per class and per 100 m, the largest ones.

Computed from the coil's defect records (:func:`summarise`): once at close, when it is stored with
the records (:mod:`coils.store`), and on read for an open coil. ``to_dict``/``from_dict`` are its
JSON form (the stored one, and what the server and the console send on).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from coils.records import DefectRecord

#: How many of the largest records (by area) a summary carries.
LARGEST = 10
#: Coil states.
OPEN, CLOSED = "open", "closed"
#: Why a coil was closed: not yet, ``EndCoil`` from the line, or a silence of its cameras.
CLOSE_REASONS = ("", "end", "silence")


@dataclass(frozen=True)
class CoilFacts:
    """A coil's lifecycle as its store keeps it: what a summary says beside its records."""

    coil_id: str
    state: str
    opened_unix_s: float
    last_frame_unix_s: float
    closed_unix_s: float | None
    close_reason: str
    length_mm: float
    frames: int
    late_frames: int


@dataclass(frozen=True)
class CoilSummary(CoilFacts):
    """What is known of one coil as a whole.

    Attributes:
        state: ``"open"`` or ``"closed"``.
        opened_unix_s, last_frame_unix_s: when its first and its latest frame were received.
        closed_unix_s: when it was closed; None while open.
        close_reason: ``""`` (open), ``"end"`` (EndCoil) or ``"silence"``.
        length_mm: EndCoil's length, else the furthest along end of any frame seen.
        frames: frames stored (distinct keys, clean ones included).
        late_frames: frames that arrived after close (kept, not merged).
        defects_per_class: records per class id (classes without records absent).
        per_100m: records per class per 100 m of ``length_mm`` (0 for a coil of no length).
        largest: the :data:`LARGEST` largest records by area, largest first.
    """

    defects_per_class: dict[int, int]
    per_100m: dict[int, float]
    largest: tuple[DefectRecord, ...]

    @property
    def defects(self) -> int:
        return sum(self.defects_per_class.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (class ids as string keys, records as :meth:`DefectRecord.to_dict`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["defects_per_class"] = {str(k): v for k, v in sorted(self.defects_per_class.items())}
        out["per_100m"] = {str(k): v for k, v in sorted(self.per_100m.items())}
        out["largest"] = [record.to_dict() for record in self.largest]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoilSummary:
        """What :meth:`to_dict` wrote; KeyError naming a missing or unknown key."""
        expected = [f.name for f in fields(cls)]
        missing = [k for k in expected if k not in data]
        unknown = [k for k in data if k not in expected]
        if missing or unknown:
            raise KeyError(f"coil summary: missing keys {missing}, unknown keys {unknown}")
        closed = data["closed_unix_s"]
        return cls(
            coil_id=str(data["coil_id"]), state=str(data["state"]), opened_unix_s=float(data["opened_unix_s"]),
            last_frame_unix_s=float(data["last_frame_unix_s"]), closed_unix_s=None if closed is None else float(closed),
            close_reason=str(data["close_reason"]), length_mm=float(data["length_mm"]), frames=int(data["frames"]),
            late_frames=int(data["late_frames"]),
            defects_per_class={int(k): int(v) for k, v in data["defects_per_class"].items()},
            per_100m={int(k): float(v) for k, v in data["per_100m"].items()},
            largest=tuple(DefectRecord.from_dict(r) for r in data["largest"]))


def summarise(facts: CoilFacts, records: Sequence[DefectRecord]) -> CoilSummary:
    """The summary of a coil whose lifecycle is ``facts`` and whose defect records are ``records``."""
    per_class: dict[int, int] = {}
    for record in records:
        per_class[record.class_id] = per_class.get(record.class_id, 0) + 1
    hundreds = facts.length_mm / 100_000.0
    per_100m = {k: (n / hundreds if hundreds > 0 else 0.0) for k, n in sorted(per_class.items())}
    largest = heapq.nsmallest(LARGEST, records, key=lambda r: (-r.area_mm2, r.along_start_mm, r.across_start_mm,
                                                              r.class_id))
    lifecycle = {f.name: getattr(facts, f.name) for f in fields(CoilFacts)}
    return CoilSummary(**lifecycle, defects_per_class=dict(sorted(per_class.items())), per_100m=per_100m,
                       largest=tuple(largest))


__all__ = ["CLOSED", "CLOSE_REASONS", "LARGEST", "OPEN", "CoilFacts", "CoilSummary", "summarise"]
