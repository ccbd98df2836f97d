"""Coil messages of the contract: :mod:`coils` records and summaries to and from their protobufs.

The server answers ``EndCoil``, ``ListCoils`` and ``GetCoil`` with them; ``server coils`` reads them
back into :class:`coils.records.DefectRecord` for its tables, exports and maps.
"""

from __future__ import annotations

import math

from coils.line import CameraGeometry, Line, Roll
from coils.periodic import PeriodicDefect
from coils.records import DefectRecord
from coils.summary import CoilSummary
from coils.verdict import CoilVerdict
from protos.inspection.v1 import inspection_pb2 as pb

#: ListCoils' page size when the request gives none, and the most one page holds.
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def record_message(record: DefectRecord) -> pb.DefectRecord:
    message = pb.DefectRecord(
        coil_id=record.coil_id, class_id=record.class_id, along_start_mm=record.along_start_mm,
        along_end_mm=record.along_end_mm, across_start_mm=record.across_start_mm,
        across_end_mm=record.across_end_mm, area_mm2=record.area_mm2,
        frames=[pb.FrameRef(camera_id=camera, frame_id=frame) for camera, frame in record.frames],
        cameras=list(record.cameras),
    )
    if record.max_probability is not None:
        message.max_probability = record.max_probability
    return message


def record_from_message(message: pb.DefectRecord) -> DefectRecord:
    return DefectRecord(
        coil_id=message.coil_id, class_id=message.class_id, along_start_mm=message.along_start_mm,
        along_end_mm=message.along_end_mm, across_start_mm=message.across_start_mm,
        across_end_mm=message.across_end_mm, area_mm2=message.area_mm2,
        max_probability=message.max_probability if message.HasField("max_probability") else None,
        frames=tuple((f.camera_id, int(f.frame_id)) for f in message.frames), cameras=tuple(message.cameras),
    )


def summary_message(summary: CoilSummary) -> pb.CoilSummary:
    message = pb.CoilSummary(
        coil_id=summary.coil_id, state=summary.state, opened_unix_s=summary.opened_unix_s,
        last_frame_unix_s=summary.last_frame_unix_s, close_reason=summary.close_reason,
        length_mm=summary.length_mm, frames=summary.frames, late_frames=summary.late_frames,
        classes=[pb.ClassDefects(class_id=k, defects=n, per_100m=summary.per_100m.get(k, 0.0))
                 for k, n in sorted(summary.defects_per_class.items())],
        largest=[record_message(r) for r in summary.largest],
    )
    if summary.closed_unix_s is not None:
        message.closed_unix_s = summary.closed_unix_s
    return message


def summary_from_message(message: pb.CoilSummary) -> CoilSummary:
    return CoilSummary(
        coil_id=message.coil_id, state=message.state, opened_unix_s=message.opened_unix_s,
        last_frame_unix_s=message.last_frame_unix_s,
        closed_unix_s=message.closed_unix_s if message.HasField("closed_unix_s") else None,
        close_reason=message.close_reason, length_mm=message.length_mm, frames=message.frames,
        late_frames=message.late_frames, defects_per_class={c.class_id: c.defects for c in message.classes},
        per_100m={c.class_id: c.per_100m for c in message.classes},
        largest=tuple(record_from_message(r) for r in message.largest),
    )


def coil_message(summary: CoilSummary, records: list[DefectRecord], verdict: CoilVerdict) -> pb.Coil:
    """``GetCoil``'s answer: summary, records, periodic defects and grade."""
    return pb.Coil(summary=summary_message(summary), records=[record_message(r) for r in records],
                   periodic=[pb.PeriodicDefect(**p.to_dict()) for p in verdict.periodic], grade=verdict.grade,
                   grade_rule=verdict.grade_rule)


def verdict_from_message(message: pb.Coil) -> CoilVerdict:
    """A ``Coil`` answer's periodic defects and grade."""
    periodic = tuple(PeriodicDefect(
        p.class_id, p.across_start_mm, p.across_end_mm, p.period_mm, p.confidence, p.first_mm, p.last_mm, p.count,
        p.roll, tuple(p.records)) for p in message.periodic)
    return CoilVerdict(periodic, message.grade, message.grade_rule)


def line_from_message(message: pb.Line) -> Line:
    """``GetLine``'s answer back as the typed line (the inverse of :func:`server.wire.line_message`)."""
    cameras = tuple(CameraGeometry(c.camera_id, c.lane_start_mm, c.mm_per_px_across, c.mm_per_px_along, c.along_axis,
                                   c.frame_width_px, c.frame_height_px) for c in message.cameras)
    return Line(message.name, message.strip_width_mm, cameras, tuple(Roll(r.name, r.diameter_mm) for r in message.rolls))


def page_request(request: pb.ListCoilsRequest) -> tuple[int, tuple[float, str] | None]:
    """(page size, the previous page's last coil as (opened, coil id)) of a ListCoils request.

    Raises:
        ValueError: a page size over :data:`MAX_PAGE_SIZE`, or a page token no page gave.
    """
    size = request.page_size or DEFAULT_PAGE_SIZE
    if size > MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be at most {MAX_PAGE_SIZE}, got {size}")
    if not request.page_token:
        return size, None
    opened, separator, coil_id = request.page_token.partition("|")
    try:
        before = float(opened)
    except ValueError:
        before = math.nan
    if not (math.isfinite(before) and separator and coil_id):
        raise ValueError(f"page_token {request.page_token[:64]!r} is not one a ListCoils page gave")
    return size, (before, coil_id)


def page_token(coils: list[CoilSummary], size: int) -> str:
    """The token of the page after ``coils`` (newest first); "" when it was the last."""
    # opened|coil id: coils opened at the same instant straddling two pages are neither skipped nor repeated
    return f"{coils[-1].opened_unix_s!r}|{coils[-1].coil_id}" if len(coils) == size else ""


def end_coil_problem(request: pb.EndCoilRequest) -> str | None:
    """Why an EndCoil request cannot be taken (an INVALID_ARGUMENT), or None."""
    if not request.coil_id:
        return "coil_id is empty: name the coil to end"
    if request.HasField("length_mm") and not (math.isfinite(request.length_mm) and request.length_mm > 0):
        return f"length_mm must be a positive number of millimetres, got {request.length_mm}"
    return None


__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "end_coil_problem", "line_from_message", "page_request", "page_token",
           "record_from_message", "record_message", "summary_from_message", "summary_message"]
