"""What the inspection service reads off and writes on the wire, apart from the batching.

* Requests are parsed here (:func:`parse_request`). ``InspectRequest.camera_id`` and ``coil_id``
  are proto3 ``string`` fields, and protobuf refuses a whole message whose string is not valid
  UTF-8: read with the generated class, one such frame would end its camera's stream. The server
  therefore parses a request that fails that way again with a bytes view of the same message (same
  field numbers, both ids as ``bytes``: identical on the wire) and answers that one frame with
  INVALID_ARGUMENT. Cameras keep sending the published ``InspectRequest`` with ``str`` ids. A
  request's coil fields are checked by :func:`coil_problem`.
* Every status that ends an ``Inspect`` stream carries the trailing-metadata key
  :data:`server.config.RESEND_KEY` (:func:`end_stream`), so a camera decides to resend or stop
  from what the server meant, not from a status code its transport may have rewritten.
* Answers (:func:`frame_response`, :func:`frame_error`), ``ModelInfo`` and ``Line`` are built here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from coils.line import Line
from engine.backends.base import Backend
from engine.metadata import class_ids
from protos.inspection.v1 import inspection_pb2 as pb
from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from server.config import MAX_CAMERA_ID_BYTES, MAX_COIL_ID_BYTES, RESEND_FINAL, RESEND_KEY, RESEND_YES, clip

if TYPE_CHECKING:
    from server.batcher import FrameResult

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InspectionService"].full_name


@dataclass(frozen=True)
class UnreadableRequest:
    """A request the server cannot take as an ``InspectRequest``.

    Attributes:
        frame_id: its frame id, when the rest of the message could be read (then only its frame
            fails); None when the message is not an ``InspectRequest`` at all (the stream ends).
        problem: what is wrong, for the answer.
    """

    frame_id: int | None
    problem: str
    camera_id: str = ""  # the id the camera sent as a bytes literal, cut short
    answer_camera_id: str = ""  # the camera id the answer carries: a readable one that fits, else ""


_BYTES_FIELDS = ("camera_id", "coil_id")


def _bytes_id_request_class() -> type:
    """``InspectRequest`` with ``camera_id`` and ``coil_id`` declared ``bytes``: the same message on the wire."""
    file = descriptor_pb2.FileDescriptorProto(name="inspection/v1/inspection_bytes_id.proto",
                                              package="inspection.v1.bytes_id", syntax="proto3")
    for message in (pb.InspectRequest, pb.RawImage):
        message.DESCRIPTOR.CopyToProto(file.message_type.add())
    for field in file.message_type[0].field:
        if field.name in _BYTES_FIELDS:
            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
        elif field.type == descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE:
            field.type_name = field.type_name.replace(".inspection.v1.", ".inspection.v1.bytes_id.")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inspection.v1.bytes_id.InspectRequest"))


_BytesIdRequest = _bytes_id_request_class()


def parse_request(data: bytes) -> pb.InspectRequest | UnreadableRequest:
    """An ``InspectRequest`` from its bytes, or what makes it unreadable (never raises)."""
    try:
        return pb.InspectRequest.FromString(data)
    except DecodeError as exc:
        error = exc
    try:
        view = _BytesIdRequest.FromString(data)
    except DecodeError as unreadable:
        return UnreadableRequest(None, f"the message is not an InspectRequest ({unreadable})")
    raw = bytes(view.camera_id)
    try:
        camera_id = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        shown = clip(repr(raw))  # a bytes literal: b'\xff...'
        return UnreadableRequest(view.frame_id, f"camera_id is not valid UTF-8 ({bad.reason} at byte {bad.start} "
                                 f"of {len(raw)}); it must be at most {MAX_CAMERA_ID_BYTES} bytes of UTF-8", shown)
    shown, echoed = repr(clip(camera_id)), camera_id if camera_id_fits(camera_id) else ""
    coil = bytes(view.coil_id)
    try:
        coil.decode("utf-8")
    except UnicodeDecodeError as bad:
        return UnreadableRequest(view.frame_id, f"coil_id {clip(repr(coil))} is not valid UTF-8 ({bad.reason} at byte "
                                 f"{bad.start} of {len(coil)}); it must be at most {MAX_COIL_ID_BYTES} bytes of "
                                 "UTF-8", shown, echoed)
    return UnreadableRequest(view.frame_id, f"the request cannot be read ({error})", shown, echoed)


def add_servicer(servicer: pb_grpc.InspectionServiceServicer, server: grpc.aio.Server) -> None:
    """``add_InspectionServiceServicer_to_server`` with :func:`parse_request` reading the frames."""
    respond = pb.InspectResponse.SerializeToString
    handlers = {
        "Inspect": grpc.stream_stream_rpc_method_handler(servicer.Inspect, request_deserializer=parse_request,
                                                         response_serializer=respond),
        "InspectOne": grpc.unary_unary_rpc_method_handler(servicer.InspectOne, request_deserializer=parse_request,
                                                          response_serializer=respond),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString,
            response_serializer=pb.ModelInfo.SerializeToString),
        "GetLineStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetLineStatus, request_deserializer=pb.GetLineStatusRequest.FromString,
            response_serializer=pb.LineStatus.SerializeToString),
        "GetLine": grpc.unary_unary_rpc_method_handler(
            servicer.GetLine, request_deserializer=pb.GetLineRequest.FromString,
            response_serializer=pb.Line.SerializeToString),
    }
    for name, request, response in (("EndCoil", pb.EndCoilRequest, pb.CoilSummary),
                                    ("ListCoils", pb.ListCoilsRequest, pb.ListCoilsResponse),
                                    ("GetCoil", pb.GetCoilRequest, pb.Coil)):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=request.FromString,
            response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def end_stream(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str, resend: bool) -> NoReturn:
    """Ends the call with ``code``, telling the camera in the trailer whether resending can help."""
    await context.abort(code, details, trailing_metadata=((RESEND_KEY, RESEND_YES if resend else RESEND_FINAL),))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def model_info(backend: Backend, max_batch: int, model_version: str | None = None) -> pb.ModelInfo:
    """``GetModelInfo``'s answer for ``backend``; ``model_version`` overrides the metadata's (a repository version)."""
    meta = backend.metadata
    return pb.ModelInfo(
        classes=[pb.DefectClass(class_id=k, name=n) for k, n in zip(meta.class_ids, meta.class_names)],
        input_height=meta.input_height,
        input_width=meta.input_width,
        thresholds=meta.thresholds,
        min_areas=meta.min_areas,
        backend=backend.name,
        precision=backend.precision,
        backend_selection=backend.selection,
        model_version=meta.model_version if model_version is None else model_version,
        device=backend.device,
        max_batch=max_batch,
        folds=meta.folds,
        encoder=meta.encoder,
        project_version=meta.project_version,
    )


def line_message(line: Line) -> pb.Line:
    """``GetLine``'s answer: the line description, field for field."""
    return pb.Line(
        name=line.name,
        strip_width_mm=line.strip_width_mm,
        cameras=[pb.CameraGeometry(camera_id=c.camera_id, lane_start_mm=c.lane_start_mm,
                                   mm_per_px_across=c.mm_per_px_across, mm_per_px_along=c.mm_per_px_along,
                                   along_axis=c.along_axis, frame_width_px=c.frame_width_px,
                                   frame_height_px=c.frame_height_px) for c in line.cameras],
        rolls=[pb.Roll(name=r.name, diameter_mm=r.diameter_mm) for r in line.rolls],
    )


def coil_problem(request: pb.InspectRequest) -> str | None:
    """What is wrong with a request's coil fields, or None (both unset, or a coil id that fits with a
    finite position >= 0)."""
    has_coil, has_position = bool(request.coil_id), request.HasField("position_mm")
    if not has_coil and not has_position:
        return None
    if not has_coil:
        return f"position_mm ({request.position_mm:g}) is given without a coil_id; send both or neither"
    if len(request.coil_id) > MAX_COIL_ID_BYTES or len(request.coil_id.encode("utf-8")) > MAX_COIL_ID_BYTES:
        return (f"coil_id {clip(request.coil_id)!r} is over {MAX_COIL_ID_BYTES} bytes of UTF-8 "
                f"({len(request.coil_id.encode('utf-8'))} bytes)")
    if not has_position:
        return f"coil_id {clip(request.coil_id)!r} is given without position_mm; send both or neither"
    if not math.isfinite(request.position_mm) or request.position_mm < 0:
        return (f"position_mm must be a finite number of millimetres >= 0 from the coil's head, got "
                f"{request.position_mm!r}")
    return None


def camera_id_fits(camera_id: str) -> bool:
    """Whether a camera id is within :data:`MAX_CAMERA_ID_BYTES` of UTF-8."""
    # More characters than bytes allowed is over without encoding a possibly huge string.
    return len(camera_id) <= MAX_CAMERA_ID_BYTES and len(camera_id.encode("utf-8")) <= MAX_CAMERA_ID_BYTES


def camera_id_problem(camera_id: str) -> str:
    size = len(camera_id) if len(camera_id) > MAX_CAMERA_ID_BYTES else len(camera_id.encode("utf-8"))
    return (f"camera_id is {'at least ' if len(camera_id) > MAX_CAMERA_ID_BYTES else ''}{size} bytes of UTF-8; "
            f"at most {MAX_CAMERA_ID_BYTES} are allowed")


def us(seconds: float) -> int:
    """Seconds as whole microseconds (``Timings``), never negative."""
    return max(0, round(seconds * 1e6))


def frame_response(request: pb.InspectRequest, result: FrameResult, model_version: str, decode_s: float,
                   total_s: float) -> pb.InspectResponse:
    """The answer of a frame that was inspected."""
    return pb.InspectResponse(
        camera_id=request.camera_id,
        frame_id=request.frame_id,
        defects=[
            pb.DefectResult(class_id=k, present=present, pixel_count=count, rle=rle)
            for k, present, count, rle in zip(class_ids(len(result.counts)), result.present, result.counts,
                                              result.rles)
        ],
        model_version=model_version,
        timings=pb.Timings(queue_us=us(result.queue_s), inference_us=us(result.inference_s),
                           postprocess_us=us(result.postprocess_s), total_us=us(total_s), decode_us=us(decode_s),
                           batch_size=result.batch_size),
    )


def frame_error(request: pb.InspectRequest | UnreadableRequest, code: grpc.StatusCode, reason: str,
                model_version: str, total_s: float) -> pb.InspectResponse:
    """The answer of a frame that failed, logged. The id is quoted cut short, and not echoed at all
    when over its bound or unreadable: nothing a camera sends makes an answer over the size limit."""
    readable = isinstance(request, pb.InspectRequest)
    frame_id = request.frame_id or 0
    camera = repr(clip(request.camera_id)) if readable else request.camera_id
    message = f"camera {camera} frame {frame_id}: {reason}"
    log.warning("event=frame_error code=%s %s", code.name, message)
    return pb.InspectResponse(
        camera_id=(request.camera_id if camera_id_fits(request.camera_id) else "") if readable
        else request.answer_camera_id,
        frame_id=frame_id,
        error=pb.FrameError(code=code.value[0], message=message),
        model_version=model_version,
        timings=pb.Timings(total_us=us(total_s)),
    )


__all__ = ["SERVICE_NAME", "UnreadableRequest", "add_servicer", "camera_id_fits", "camera_id_problem", "coil_problem",
           "end_stream", "frame_error", "frame_response", "line_message", "model_info", "parse_request", "us"]
