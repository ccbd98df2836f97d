"""``server coils``: a coil-tracking server's coils, read back over gRPC.

``list`` prints the newest coils as a table; ``show COIL`` its summary and defect records;
``export COIL --format csv|json --out FILE`` writes the records (JSON with the summary);
``map COIL --out FILE.png|.svg`` draws the coil map (:func:`coils.coilmap.render_map`) with the
server's line geometry.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

HELP = "list, show, export and map the coils of a coil-tracking server (server serve --coil-db)"
FORMATS = ("csv", "json")
#: The CSV columns of ``export``: a record's fields, frames as ``camera/frame`` joined by spaces.
RECORD_COLUMNS = ("coil_id", "class_id", "along_start_mm", "along_end_mm", "across_start_mm", "across_end_mm",
                  "area_mm2", "max_probability", "cameras", "frames")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", required=True, help="server address HOST:PORT")
    common.add_argument("--tls-ca", type=Path, default=None, help="PEM root certificate: connect with TLS")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer (default: 30)")
    sub = parser.add_subparsers(dest="coils_command", metavar="ACTION", required=True)
    listing = sub.add_parser("list", parents=[common], help="the newest coils, a table")
    listing.add_argument("--limit", type=int, default=20, help="coils to list (default: 20)")
    show = sub.add_parser("show", parents=[common], help="a coil's summary and defect records")
    export = sub.add_parser("export", parents=[common], help="a coil's defect records as CSV or JSON")
    export.add_argument("--format", choices=FORMATS, default="csv", help="file format (default: csv)")
    drawing = sub.add_parser("map", parents=[common], help="the coil map as a PNG or SVG file")
    grading = sub.add_parser("grade", parents=[common], help="grade a coil by another rule file (nothing stored)")
    grading.add_argument("--grading", type=Path, required=True, help="the rule file (grades:), as server serve --grading")
    for action in (show, export, drawing, grading):
        action.add_argument("coil_id", metavar="COIL", help="the coil id")
    export.add_argument("--out", type=Path, required=True, help="the file to write")
    drawing.add_argument("--out", type=Path, required=True, help="the file to write: .png or .svg")


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    """One unary call to the server; ConnectionError naming the status when it fails."""
    import grpc

    from client.stream_folder import channel_credentials
    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

    credentials = channel_credentials(args.tls_ca)
    channel = (grpc.secure_channel(args.target, credentials) if credentials is not None
               else grpc.insecure_channel(args.target))
    with channel:
        try:
            return getattr(pb_grpc.InspectionServiceStub(channel), method)(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            raise ConnectionError(f"{args.target}: {method}: {exc.code().name}: {exc.details()}") from None


def list_coils(args: argparse.Namespace, limit: int) -> list[Any]:
    """Up to ``limit`` coil summaries (protobufs), newest first, over as many pages as it takes."""
    from protos.inspection.v1 import inspection_pb2 as pb
    from server.coil_wire import MAX_PAGE_SIZE

    coils: list[Any] = []
    token = ""
    while len(coils) < limit:
        page = _call(args, "ListCoils", pb.ListCoilsRequest(page_size=min(MAX_PAGE_SIZE, limit - len(coils)),
                                                            page_token=token))
        coils += page.coils
        token = page.next_page_token
        if not token:
            break
    return coils


def _when(unix_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix_s)) if unix_s else "-"


def format_coils(coils: list[Any]) -> str:
    rows = [("coil", "state", "opened (UTC)", "length m", "frames", "late", "defects", "per class")]
    for c in coils:
        per_class = " ".join(f"{k.class_id}:{k.defects}" for k in c.classes) or "-"
        state = c.state if c.state == "open" else f"{c.state} ({c.close_reason})"
        rows.append((c.coil_id, state, _when(c.opened_unix_s), f"{c.length_mm / 1000:.3f}", str(c.frames),
                     str(c.late_frames), str(sum(k.defects for k in c.classes)), per_class))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def record_row(record: Any) -> dict[str, Any]:
    """A ``coils.records.DefectRecord`` as one export row (:data:`RECORD_COLUMNS`)."""
    return {"coil_id": record.coil_id, "class_id": record.class_id, "along_start_mm": record.along_start_mm,
            "along_end_mm": record.along_end_mm, "across_start_mm": record.across_start_mm,
            "across_end_mm": record.across_end_mm, "area_mm2": record.area_mm2,
            "max_probability": "" if record.max_probability is None else record.max_probability,
            "cameras": " ".join(record.cameras), "frames": " ".join(f"{c}/{f}" for c, f in record.frames)}


def format_coil(summary: Any, records: list[Any]) -> str:
    """A coil's summary and its records as text (``summary`` a ``CoilSummary``, records ``DefectRecord``s)."""
    closed = f", closed {_when(summary.closed_unix_s)} ({summary.close_reason})" if summary.closed_unix_s else ""
    lines = [f"coil {summary.coil_id}: {summary.state}, opened {_when(summary.opened_unix_s)}{closed}",
             f"  length {summary.length_mm / 1000:.3f} m, {summary.frames} frames stored, {summary.late_frames} late",
             f"  {len(records)} defect records"]
    for class_id, count in sorted(summary.defects_per_class.items()):
        lines.append(f"  class {class_id}: {count} defects, {summary.per_100m.get(class_id, 0.0):.2f} per 100 m")
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n")
    writer.writerow(RECORD_COLUMNS[1:8] + ("cameras",))
    for r in records:
        row = record_row(r)
        writer.writerow([row["class_id"], *(f"{row[c]:.1f}" for c in RECORD_COLUMNS[2:7]), row["max_probability"],
                         row["cameras"]])
    return "\n".join(lines) + "\n" + text.getvalue().rstrip("\n")


def export_coil(summary: Any, records: list[Any], fmt: str, out: Path) -> Path:
    """Writes the records as CSV (:data:`RECORD_COLUMNS`) or JSON (``{"summary", "records"}``)."""
    from engine.files import atomic_write

    if fmt == "json":
        content = json.dumps({"summary": summary.to_dict(), "records": [r.to_dict() for r in records]}, indent=1)
    else:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=RECORD_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(record_row(r) for r in records)
        content = text.getvalue()
    return atomic_write(out, content.encode(), make_parents=True)


def get_coil(args: argparse.Namespace) -> tuple[Any, list[Any], Any]:
    """The coil's ``CoilSummary``, ``DefectRecord``s and ``CoilVerdict`` (periodic defects, grade)."""
    from protos.inspection.v1 import inspection_pb2 as pb
    from server.coil_wire import record_from_message, summary_from_message, verdict_from_message

    coil = _call(args, "GetCoil", pb.GetCoilRequest(coil_id=args.coil_id))
    return (summary_from_message(coil.summary), [record_from_message(r) for r in coil.records],
            verdict_from_message(coil))


def regrade(args: argparse.Namespace, summary: Any, records: list[Any], verdict: Any) -> str:
    """The coil graded by ``--grading`` here, against the server's line and the model's classes.

    Read-only: the coil keeps the grade it got at close (the mill's rules); a customer's rules give
    their grade on demand, from the records any reader may fetch, without a write to the database.
    """
    from coils.grading import load_grading
    from protos.inspection.v1 import inspection_pb2 as pb
    from server.coil_wire import line_from_message

    line = line_from_message(_call(args, "GetLine", pb.GetLineRequest()))
    info = _call(args, "GetModelInfo", pb.GetModelInfoRequest())
    names = [c.name for c in sorted(info.classes, key=lambda c: c.class_id)]
    grading = load_grading(args.grading, line, names)
    if grading is None:
        raise ValueError(f"--grading {args.grading}: the file has no grades:")
    grade, rule = grading.grade(summary, records, verdict.periodic)
    stored = f"{verdict.grade} ({verdict.grade_rule})" if verdict.grade else "none"
    return f"coil {summary.coil_id}: grade {grade} by rule {rule!r} ({args.grading}); stored grade: {stored}"


def run(args: argparse.Namespace) -> int:
    if args.coils_command == "list":
        coils = list_coils(args, args.limit)
        print(format_coils(coils) if coils else "no coils")
        return 0
    if args.coils_command == "map" and args.out.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"--out {args.out}: a coil map is written as .png or .svg")
    summary, records, verdict = get_coil(args)
    if args.coils_command == "grade":
        print(regrade(args, summary, records, verdict))
    elif args.coils_command == "show":
        print(format_coil(summary, records))
        print(verdict.describe())
    elif args.coils_command == "export":
        path = export_coil(summary, records, args.format, args.out)
        print(f"{len(records)} records of coil {summary.coil_id} written to {path}", file=sys.stderr)
    else:
        from coils.coilmap import render_map
        from protos.inspection.v1 import inspection_pb2 as pb
        from server.coil_wire import line_from_message

        line = line_from_message(_call(args, "GetLine", pb.GetLineRequest()))
        path = render_map(line, summary, records, args.out, periodic=verdict.periodic)
        print(f"coil map of {summary.coil_id} ({len(records)} records) written to {path}", file=sys.stderr)
    return 0
