"""``server status`` (and ``camera status``): a running server's line status (``GetLineStatus``) for a person or a script.

Prints whether drift monitoring is on (and why not), each camera's window and its scores per
statistic (``*`` marks a score over its threshold), the capture counters and coil tracking's (frames
stored, spooled while the database is down, late); ``--json`` prints the
``LineStatus`` message as JSON instead.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

HELP = "show a running server's line status: drift per camera and statistic, capture counters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="server address HOST:PORT")
    parser.add_argument("--camera", default="", help="only this camera (default: every camera)")
    parser.add_argument("--json", action="store_true", help="print the LineStatus message as JSON")
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM root certificate: connect with TLS")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the server (default: 10)")


async def line_status(target: str, camera_id: str = "", credentials: Any = None, timeout: float = 10.0) -> Any:
    """The server's ``LineStatus``.

    Raises:
        ConnectionError: the server cannot be reached in ``timeout`` seconds, or refuses the call.
    """
    import grpc

    from protos.inspection.v1 import inspection_pb2 as pb
    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

    channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
               else grpc.aio.insecure_channel(target))
    async with channel:
        try:
            async with asyncio.timeout(timeout):
                await channel.channel_ready()
        except TimeoutError:
            raise ConnectionError(f"cannot reach an inspection server at {target} within {timeout:g} s") from None
        try:
            return await pb_grpc.InspectionServiceStub(channel).GetLineStatus(
                pb.GetLineStatusRequest(camera_id=camera_id), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise ConnectionError(f"{target}: {exc.code().name}: {exc.details()}") from None


def format_status(status: Any) -> str:
    """A ``LineStatus`` as text, one block per camera."""
    lines = [f"model {status.model_version}"]
    if status.drift_enabled:
        lines.append(
            f"drift: on; windows of {status.drift_window} frames, scored from {status.drift_min_frames}; "
            f"thresholds PSI {status.psi_threshold:g}, KS {status.ks_threshold:g} (* = over)"
        )
        if not status.cameras:
            lines.append("  no camera seen yet")
        width = max([len(s) for s in status.statistics] + [10])
        for camera in status.cameras:
            over = ", ".join(camera.over_threshold) or "none"
            lines.append(f"camera {camera.camera_id!r}: {camera.frames_seen} frames seen, window "
                         f"{camera.window_fill}/{status.drift_window}, over threshold: {over}")
            if not camera.scored:
                lines.append(f"  not scored until the window holds {status.drift_min_frames} frames")
            for score in camera.scores:
                psi = f"PSI {score.psi:7.3f}{'*' if score.psi_over_threshold else ' '}"
                ks = f"KS {score.ks:6.3f}{'*' if score.ks_over_threshold else ''}" if score.HasField("ks") else ""
                lines.append(f"  {score.statistic:<{width}}  {psi}  {ks}".rstrip())
        if status.cameras_omitted:
            lines.append(f"... and {status.cameras_omitted} more cameras not listed (the server lists at most "
                         f"{len(status.cameras)}, drifting ones first; {status.cameras_tracked} tracked)")
    else:
        lines.append(f"drift: off ({status.drift_state})")
    c = status.capture
    if c.enabled:
        used = "not counted yet" if c.bytes_used < 0 else f"{c.bytes_used / 1e9:.3f} of {c.quota_bytes / 1e9:.3f} GB used"
        lines.append(
            f"capture: {c.policy} to {c.directory}; {c.offered} offered, {c.selected} chosen, {c.written} written, "
            f"{c.queued} queued; skipped: {c.skipped_queue_full} queue full, {c.skipped_quota} quota, "
            f"{c.skipped_error} errors; {used}"
        )
    else:
        lines.append("capture: off")
    k = status.coils
    if k.enabled:
        lines.append(
            f"coils: database {k.db_state}; {k.frames_stored} frames stored, {k.spool_frames} spooled "
            f"({k.spool_bytes} bytes), {k.late_frames} late, {k.refused_frames} refused; {k.open_coils} open, "
            f"{k.coils_closed} closed"
        )
    else:
        lines.append("coils: not tracked (server serve --coil-db)")
    if status.feedback_skipped_batches:
        lines.append(f"line feedback fell behind: {status.feedback_skipped_batches} batches skipped")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from client.stream_folder import channel_credentials

    status = asyncio.run(line_status(args.target, args.camera, channel_credentials(args.tls_ca), args.timeout))
    if args.json:
        from google.protobuf.json_format import MessageToJson

        print(MessageToJson(status, preserving_proto_field_name=True))
    else:
        print(format_status(status))
    return 0
