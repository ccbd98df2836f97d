"""``server serve``: serve a model file over gRPC until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from engine.backends import BACKEND_CHOICES
from engine.backends.int8 import INT8_IR_SUFFIX
from server import config
from server.auth import add_arguments as add_admin_arguments

HELP = "serve a model (.onnx, .xml, .engine/.plan, .pt) over gRPC with dynamic batching"
DESCRIPTION = (
    "Serves the inspection.v1.InspectionService on --bind:--port. Health says NOT_SERVING until the "
    "model is loaded and warmed up, SERVING after. SIGTERM/SIGINT: health NOT_SERVING, no new calls, "
    "every frame already read is answered, exit 0. When the model carries a drift reference, every "
    "camera's frame statistics are scored against it (GetLineStatus, /metrics, a log warning per "
    "crossing); --capture-dir saves chosen frames with their predictions for retraining; --line with --coil-db "
    "stores every coil frame's defects before its answer and merges them into defect records per coil; --model-repo serves a "
    "model repository whose versions 'server models' loads, shadows, promotes and rolls back without a restart "
    "(docs/models.md)."
)

if TYPE_CHECKING:
    from server.models import ModelManager
    from server.service import InspectionServer

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from server.console import add_arguments as add_console_arguments

    add_console_arguments(parser)  # --console-port, a group of its own (listed after the server's options)
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--model", type=Path,
                        help="model file: .onnx, .xml (OpenVINO IR), .engine/.plan or .pt (a repository of one)")
    models.add_argument("--model-repo", type=Path, metavar="DIR",
                        help="model repository: DIR/<version>/model.{onnx,xml,engine,pt}; serves its production "
                        "version (DIR/roles.json, else the newest) and can hot-swap others (docs/models.md)")
    parser.add_argument("--allow-class-change", action="store_true",
                        help="a version whose classes differ from production's may be promoted")
    parser.add_argument("--shadow-share", type=float, default=0.0, metavar="SHARE",
                        help="run the loaded candidate on this share (0..1) of live frames, off the hot path, and "
                        "measure its agreement with production (default 0: off; 'server models shadow' changes it)")
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
    add_admin_arguments(parser)  # --admin-subjects, --admin-token-file


config_from_args = config.config_from_args


def model_server(args: argparse.Namespace) -> tuple[InspectionServer, ModelManager]:
    """The InspectionServer and its ModelManager that ``args`` ask for (nothing is loaded yet).

    Raises:
        FileNotFoundError: no such model file.
        ValueError: an unknown model suffix, a bad setting, a bad repository (RepositoryError).
    """
    from engine.backends import backend_class, choose_backend, load_backend
    from server.auth import policy_from_args
    from server.control import add_model_control
    from server.model_repo import ModelRepository
    from server.models import ModelManager, production_loader
    from server.service import InspectionServer

    if args.model_repo is not None and args.int8_ir not in ("auto", "off"):
        raise ValueError("--int8-ir PATH names one model's IR; with --model-repo each version's int8 IR is found "
                         "beside its model (--int8-ir auto) or none is used (off)")
    if args.model is not None:
        backend_class(args.model)  # an unknown suffix fails now, before a port opens
        if not args.model.is_file():
            raise FileNotFoundError(f"--model {args.model}: no such model file")
        repository = ModelRepository.of_file(args.model)
    else:
        repository = ModelRepository.open(args.model_repo)
    first = repository.model_file(repository.roles.production)
    backend_class(first)
    chosen, why = choose_backend(first, args.device, args.backend, args.precision, args.int8_ir)
    options = {}
    if args.threads is not None:
        if chosen not in ("onnxruntime", "openvino"):
            raise ValueError(f"--threads applies to ONNX Runtime and OpenVINO models (.onnx, .xml), not {first.suffix}")
        options["threads"] = args.threads
    config = config_from_args(args)
    policy = policy_from_args(args)
    log.info("event=backend_choice backend=%s reason=%r", chosen, why)

    def load(path: Path):
        return load_backend(path, device=args.device, backend=args.backend, precision=args.precision,
                            int8=args.int8_ir, **options)

    label = None if repository.is_single_file else repository.roles.production
    server = InspectionServer(production_loader(repository, load), config, model_version=label)
    manager = ModelManager(server, repository, load, allow_class_change=args.allow_class_change,
                           shadow_share=args.shadow_share)
    add_model_control(server, manager, policy)
    return server, manager


async def serve(args: argparse.Namespace) -> int:
    server, manager = model_server(args)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start(wait_ready=False)
    console = None
    if args.console_port is not None:
        console = await _start_console(server, args, manager)
    ready = loop.create_task(server.wait_ready())
    stop_wait = loop.create_task(stop.wait())
    await asyncio.wait({ready, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        stop_wait.cancel()
        if console is not None:
            await console.stop()
        await server.stop(grace=0)
        await manager.close()
        raise ready.exception()  # type: ignore[misc]
    await manager.restore_candidate()  # a restarted server loads the candidate its roles name
    await stop_wait
    log.info("event=signal action=drain")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await server.stop(grace=args.grace)
    await manager.close()
    if console is not None:
        await console.stop()
    ready.cancel()
    await asyncio.gather(ready, return_exceptions=True)
    return 0


async def _start_console(server, args: argparse.Namespace, manager):
    from server.console import Console, ConsoleConfig

    console = Console(server, ConsoleConfig(port=args.console_port, bind=args.bind, tls_cert=args.tls_cert,
                                            tls_key=args.tls_key), models=manager)
    try:
        await console.start()
    except BaseException:
        await server.stop(grace=0)
        raise
    return console


def run(args: argparse.Namespace) -> int:
    return asyncio.run(serve(args))
