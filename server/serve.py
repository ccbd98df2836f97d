"""``server serve``: serve a model file over gRPC until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from engine.backends import BACKEND_CHOICES
from engine.backends.int8 import INT8_IR_SUFFIX
from server import config

HELP = "serve a model (.onnx, .xml, .engine/.plan, .pt) over gRPC with dynamic batching"
DESCRIPTION = (
    "Serves the inspection.v1.InspectionService on --bind:--port. Health says NOT_SERVING until the "
    "model is loaded and warmed up, SERVING after. SIGTERM/SIGINT: health NOT_SERVING, no new calls, "
    "every frame already read is answered, exit 0. When the model carries a drift reference, every "
    "camera's frame statistics are scored against it (GetLineStatus, /metrics, a log warning per "
    "crossing); --capture-dir saves chosen frames with their predictions for retraining; --line with --coil-db "
    "stores every coil frame's defects before its answer and merges them into defect records per coil."
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from server.console import add_arguments as add_console_arguments

    add_console_arguments(parser)  # --console-port, a group of its own (listed after the server's options)
    parser.add_argument("--model", type=Path, required=True,
                        help="model file: .onnx, .xml (OpenVINO IR), .engine/.plan or .pt")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="runtime for the model (default auto: for .onnx on a CPU the int8 IR beside it "
                        "(see --int8-ir), else OpenVINO bf16 where the CPU has native bf16 and openvino is "
                        "installed, else ONNX Runtime fp32; the server log, GetModelInfo and 'engine info' say which)")
    parser.add_argument("--int8-ir", default="auto", metavar="auto|off|PATH",
                        help="for an .onnx model on the CPU: auto (default) runs the int8 OpenVINO IR beside it "
                        f"(model{INT8_IR_SUFFIX}) where the CPU has VNNI or AMX-INT8 and the IR's recorded parity "
                        "against this graph passed; off never; PATH runs that IR (built from this graph, parity "
                        "passed) on any CPU")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "int8", "fp16"),
                        help="ask for a precision where the backend has a choice (OpenVINO, torch)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for ONNX Runtime / OpenVINO (.onnx, .xml) models (default: one per core)")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds to finish accepted frames on shutdown (default: 30)")
    config.add_arguments(parser)  # every ServerConfig field, its default and help from the dataclass


config_from_args = config.config_from_args


async def serve(args: argparse.Namespace) -> int:
    from engine.backends import backend_class, choose_backend, load_backend
    from server.service import InspectionServer

    backend_class(args.model)  # an unknown suffix fails now, before a port opens
    if not args.model.is_file():
        raise FileNotFoundError(f"--model {args.model}: no such model file")
    chosen, why = choose_backend(args.model, args.device, args.backend, args.precision, args.int8_ir)
    options = {}
    if args.threads is not None:
        if chosen not in ("onnxruntime", "openvino"):
            raise ValueError(f"--threads applies to ONNX Runtime and OpenVINO models (.onnx, .xml), not {args.model.suffix}")
        options["threads"] = args.threads
    config = config_from_args(args)
    log.info("event=backend_choice backend=%s reason=%r", chosen, why)
    server = InspectionServer(
        lambda: load_backend(args.model, device=args.device, backend=args.backend, precision=args.precision,
                             int8=args.int8_ir, **options),
        config,
    )

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start(wait_ready=False)
    console = None
    if args.console_port is not None:
        console = await _start_console(server, args)
    ready = loop.create_task(server.wait_ready())
    stop_wait = loop.create_task(stop.wait())
    await asyncio.wait({ready, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        stop_wait.cancel()
        if console is not None:
            await console.stop()
        await server.stop(grace=0)
        raise ready.exception()  # type: ignore[misc]
    await stop_wait
    log.info("event=signal action=drain")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await server.stop(grace=args.grace)
    if console is not None:
        await console.stop()
    ready.cancel()
    await asyncio.gather(ready, return_exceptions=True)
    return 0


async def _start_console(server, args: argparse.Namespace):
    from server.console import Console, ConsoleConfig

    console = Console(server, ConsoleConfig(port=args.console_port, bind=args.bind, tls_cert=args.tls_cert,
                                            tls_key=args.tls_key))
    try:
        await console.start()
    except BaseException:
        await server.stop(grace=0)
        raise
    return console


def run(args: argparse.Namespace) -> int:
    return asyncio.run(serve(args))
