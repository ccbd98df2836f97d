"""``server serve``: serve a model file over gRPC until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from engine.backends import BACKEND_CHOICES

if TYPE_CHECKING:
    from server.service import ServerConfig

HELP = "serve a model (.onnx, .xml, .engine/.plan, .pt) over gRPC with dynamic batching"
DESCRIPTION = (
    "Serves the inspection.v1.InspectionService on --bind:--port. Health says NOT_SERVING until the "
    "model is loaded and warmed up, SERVING after. SIGTERM/SIGINT: health NOT_SERVING, no new calls, "
    "every frame already read is answered, exit 0. When the model carries a drift reference, every "
    "camera's frame statistics are scored against it (GetLineStatus, /metrics, a log warning per "
    "crossing); --capture-dir saves chosen frames with their predictions for retraining."
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model file: .onnx, .xml (OpenVINO IR), .engine/.plan or .pt")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="runtime for the model (default auto: for .onnx on a CPU OpenVINO bf16 where the CPU "
                        "has native bf16 and openvino is installed, else ONNX Runtime fp32; the server log, "
                        "GetModelInfo and 'engine info' say which)")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "int8", "fp16"),
                        help="ask for a precision where the backend has a choice (OpenVINO, torch)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for ONNX Runtime / OpenVINO (.onnx, .xml) models (default: one per core)")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default: 50051)")
    parser.add_argument("--max-batch", type=int, default=16, help="most frames per inference batch (default: 16)")
    parser.add_argument("--max-delay-ms", type=float, default=5.0,
                        help="longest a frame waits for its batch to fill (default: 5)")
    parser.add_argument("--max-inflight", type=int, default=256,
                        help="frames read and not yet answered over all calls (default: 256)")
    parser.add_argument("--max-stream-inflight", type=int, default=64,
                        help="frames read and not yet answered per stream (default: 64)")
    parser.add_argument("--metrics-port", type=int, default=9100,
                        help="Prometheus /metrics port; 0 picks a free one, -1 disables (default: 9100)")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--decode-workers", type=int, default=2,
                        help="threads decoding frames and encoding results (default: 2)")
    parser.add_argument("--max-frame-pixels", type=int, default=4096 * 4096,
                        help="largest width x height a frame may declare (default: 16777216)")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds to finish accepted frames on shutdown (default: 30)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up batches before SERVING")
    from engine import drift
    from server import capture

    group = parser.add_argument_group("drift monitoring (when the model carries a drift reference)")
    group.add_argument("--drift-window", type=int, default=drift.DEFAULT_WINDOW,
                       help="frames per camera in the rolling window (default: %(default)s)")
    group.add_argument("--drift-min-frames", type=int, default=drift.DEFAULT_MIN_FILL,
                       help="frames a camera's window needs before it is scored (default: %(default)s)")
    group.add_argument("--drift-psi-threshold", type=float, default=drift.DEFAULT_PSI_THRESHOLD,
                       help="population stability index above which a statistic has drifted (default: %(default)s)")
    group.add_argument("--drift-ks-threshold", type=float, default=drift.DEFAULT_KS_THRESHOLD,
                       help="KS statistic above which a statistic has drifted (default: %(default)s)")
    capture.add_arguments(parser)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    from server import capture
    from server.service import ServerConfig

    for flag in ("tls_cert", "tls_key"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file")
    return ServerConfig(
        bind=args.bind,
        port=args.port,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        max_inflight=args.max_inflight,
        max_stream_inflight=args.max_stream_inflight,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        decode_workers=args.decode_workers,
        max_frame_pixels=args.max_frame_pixels,
        warmup=not args.no_warmup,
        drift_window=args.drift_window,
        drift_min_frames=args.drift_min_frames,
        drift_psi_threshold=args.drift_psi_threshold,
        drift_ks_threshold=args.drift_ks_threshold,
        capture=capture.config_from_args(args),
    )


async def serve(args: argparse.Namespace) -> int:
    from engine.backends import backend_class, choose_backend, load_backend
    from server.service import InspectionServer

    backend_class(args.model)  # an unknown suffix fails now, before a port opens
    if not args.model.is_file():
        raise FileNotFoundError(f"--model {args.model}: no such model file")
    chosen, why = choose_backend(args.model, args.device, args.backend, args.precision)
    options = {}
    if args.threads is not None:
        if chosen not in ("onnxruntime", "openvino"):
            raise ValueError(f"--threads applies to ONNX Runtime and OpenVINO models (.onnx, .xml), not {args.model.suffix}")
        options["threads"] = args.threads
    config = config_from_args(args)
    log.info("event=backend_choice backend=%s reason=%r", chosen, why)
    server = InspectionServer(
        lambda: load_backend(args.model, device=args.device, backend=args.backend, precision=args.precision, **options),
        config,
    )

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start(wait_ready=False)
    ready = loop.create_task(server.wait_ready())
    stop_wait = loop.create_task(stop.wait())
    await asyncio.wait({ready, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        stop_wait.cancel()
        await server.stop(grace=0)
        raise ready.exception()  # type: ignore[misc]
    await stop_wait
    log.info("event=signal action=drain")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await server.stop(grace=args.grace)
    ready.cancel()
    await asyncio.gather(ready, return_exceptions=True)
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(serve(args))
