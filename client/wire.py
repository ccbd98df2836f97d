"""The limits and trailers of the wire protocol, owned here and imported by both sides.

A camera must respect them before it sends (:mod:`client.camera` refuses an oversize frame
locally); the server enforces them (``server.config`` takes its defaults from here).
``protos/inspection/v1/inspection.proto`` names them. This module imports nothing, so the camera
side stays installable without the server.
"""

from __future__ import annotations

#: Longest ``camera_id`` (UTF-8 bytes) a request may carry; longer ones are answered INVALID_ARGUMENT.
#: Bounded so that nothing a camera sends can make an answer (which echoes the id) exceed the
#: message size limit, and so that ids stay cheap as metric labels and status entries.
MAX_CAMERA_ID_BYTES = 256
#: Longest ``coil_id`` (UTF-8 bytes) a request may carry, bounded like the camera id and for the same reasons.
MAX_COIL_ID_BYTES = 256
#: gRPC message size limit, both directions (receive and send). A request over it ends the whole
#: stream (gRPC RESOURCE_EXHAUSTED): a camera must refuse such a frame itself before sending it.
#: 16 MiB is well above a full-resolution raw BGR8 Severstal frame (256 x 1600 x 3 = 1.2 MB).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Trailing-metadata key of every status the server ends an ``Inspect`` stream with: whether the
#: camera should resend its unanswered frames (to this server later, or to another). A camera
#: decides from it rather than from the status code, which its transport may rewrite (grpc.aio
#: reports a status that arrives while it is writing as INTERNAL, grpc/grpc#36066).
RESEND_KEY = "inspection-resend"
RESEND_YES = "yes"
RESEND_FINAL = "no"

__all__ = ["MAX_CAMERA_ID_BYTES", "MAX_COIL_ID_BYTES", "MAX_MESSAGE_BYTES", "RESEND_FINAL", "RESEND_KEY", "RESEND_YES"]
