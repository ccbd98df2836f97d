"""``engine build``: an exported ONNX inspection graph -> a TensorRT engine plus its JSON sidecar.

Precision, by TensorRT release:

- FP16 ONNX (``trainer export --precision fp16``): a strongly typed network on TensorRT 10 and 11;
  every tensor keeps the type the graph gives it (U-Nets fp16, pre/post-processing fp32, counts int32).
- FP32 ONNX, ``--precision fp16``: TensorRT 10 only, with ``BuilderFlag.FP16``; the layers outside
  the U-Nets (normalisation, resizes, fold mean, threshold, count) are pinned to fp32, so counts stay
  exact. TensorRT 11 removed the flag: such a build stops and says to export an FP16 graph.
- FP32 ONNX, ``--precision fp32``: a strongly typed fp32 network.

One optimisation profile covers the batch dimension (min/opt/max); a timing cache file, when
given, is read before and written after the build so rebuilds skip kernel timing.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import graph
from engine.backends.tensorrt import (
    EngineSidecar,
    gpu_identity,
    import_tensorrt,
    sidecar_path,
    write_sidecar,
)
from engine.cli_util import CLIError
from engine.devices import BackendUnavailable
from engine.files import atomic_write
from engine.graph import UNET_LAYER_MARK
from engine.metadata import ModelMetadata, read_onnx_metadata

log = logging.getLogger(__name__)

HELP = "build a TensorRT engine (and its .json sidecar), or an OpenVINO IR (--target openvino), from an exported ONNX graph"
DESCRIPTION = __doc__.split("\n\n", 1)[0]

STRONGLY_TYPED = "strongly-typed"
FP16_FLAG = "fp16-builder-flag"


@dataclass(frozen=True)
class BuildPlan:
    """Everything decided before TensorRT is touched (validated without it)."""

    onnx_path: Path
    out_path: Path
    metadata: ModelMetadata
    precision: str
    typing: str
    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_gb: float
    timing_cache: Path | None

    def profile(self) -> dict[str, list[int]]:
        h, w = self.metadata.input_size
        return {
            "min": [self.min_batch, h, w],
            "opt": [self.opt_batch, h, w],
            "max": [self.max_batch, h, w],
        }


def choose_typing(onnx_precision: str, precision: str, has_fp16_flag: bool, onnx_path: str | Path = "model.onnx") -> str:
    """How to build ``precision`` from a graph of ``onnx_precision`` (see the module docstring).

    Raises:
        ValueError: a combination that cannot give the asked-for engine, saying what to do instead.
    """
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"--precision must be fp16 or fp32, got {precision!r}")
    if onnx_precision == precision:
        return STRONGLY_TYPED
    if onnx_precision == "fp16":
        raise ValueError(
            f"{onnx_path} is an FP16 graph; an fp32 engine needs the FP32 export "
            "('trainer export --precision fp32'), or build this one with --precision fp16"
        )
    if has_fp16_flag:
        return FP16_FLAG
    raise ValueError(
        f"{onnx_path} is an FP32 graph and this TensorRT has no FP16 builder flag (removed in TensorRT 11, "
        "where precision comes from the graph): export an FP16 graph with 'trainer export --precision fp16 "
        "--out model_fp16.onnx' and build from it, or build with --precision fp32"
    )


def plan_build(
    onnx_path: str | Path,
    out_path: str | Path,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    workspace_gb: float = 4.0,
    timing_cache: str | Path | None = None,
    has_fp16_flag: bool = True,
) -> BuildPlan:
    """Validates the build request; raises ValueError/FileNotFoundError naming the bad flag or file."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"--onnx {onnx_path}: no such file")
    if out_path.suffix.lower() not in (".engine", ".plan"):
        raise ValueError(f"--out {out_path}: a TensorRT engine file must end in .engine or .plan")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"batch profile must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch, got "
            f"{min_batch} / {opt_batch} / {max_batch}"
        )
    if workspace_gb <= 0:
        raise ValueError(f"--workspace-gb must be positive, got {workspace_gb}")
    metadata = read_onnx_metadata(str(onnx_path))
    typing = choose_typing(metadata.precision, precision, has_fp16_flag, onnx_path)
    return BuildPlan(
        onnx_path=onnx_path,
        out_path=out_path,
        metadata=ModelMetadata.from_dict({**metadata.to_dict(), "precision": precision}),
        precision=precision,
        typing=typing,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_gb=workspace_gb,
        timing_cache=Path(timing_cache) if timing_cache else None,
    )


@dataclass
class BuildReport:
    engine_path: Path
    sidecar_path: Path
    log_path: Path
    sidecar: EngineSidecar

    def summary(self) -> str:
        s = self.sidecar
        return (
            f"wrote {self.engine_path} ({s.engine_size / 1e6:.1f} MB) and {self.sidecar_path.name}: TensorRT "
            f"{s.tensorrt_version}, {s.gpu_name} (sm {s.compute_capability}), {s.precision} ({s.typing}), batch "
            f"{s.profile['min'][0]}/{s.profile['opt'][0]}/{s.profile['max'][0]}, {s.network_layers} network layers -> "
            f"{s.engine_layers if s.engine_layers is not None else '?'} engine layers in {s.build_seconds:.1f} s; "
            f"build log {self.log_path.name}"
        )


def _pin_outside_unets_to_fp32(trt: Any, network: Any) -> int:
    """Under the FP16 builder flag, keeps every float layer outside the U-Nets in fp32 (exact counts,
    identical thresholds). Returns how many layers were pinned."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if UNET_LAYER_MARK in layer.name or layer.num_inputs == 0:
            continue
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        if any(t is not None and t.dtype != trt.float32 for t in inputs):
            continue  # casts from uint8 and integer shape arithmetic have no float precision to pin
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.float32:
                layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def build_engine(plan: BuildPlan) -> BuildReport:
    """Builds the engine ``plan`` describes, writes it, its sidecar and its build log.

    Raises:
        BackendUnavailable: TensorRT or a GPU is missing.
        RuntimeError: the ONNX parser or the builder failed (their messages are included).
    """
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("engine build needs a CUDA GPU (the engine is built for the GPU it runs on); none is visible here")
    gpu_name, capability = gpu_identity(0)
    lines: list[str] = []
    logger = _build_logger(trt, lines)
    builder = trt.Builder(logger)
    network, parser = _parse_network(trt, builder, logger, plan)
    config = _builder_config(trt, builder, network, plan)

    log.info(
        "building %s engine from %s (%d network layers, %s, batch %d/%d/%d) on %s...",
        plan.precision, plan.onnx_path, network.num_layers, plan.typing,
        plan.min_batch, plan.opt_batch, plan.max_batch, gpu_name,
    )
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - started
    if serialized is None:
        errors = [line for line in lines if line.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
        raise RuntimeError(
            f"TensorRT built no engine from {plan.onnx_path}: {'; '.join(errors[-3:]) or 'see the build log'}"
            " (if it mentions memory, raise --workspace-gb or lower --max-batch)"
        )
    data = bytes(serialized)
    del parser
    if plan.timing_cache is not None:
        atomic_write(plan.timing_cache, bytes(config.get_timing_cache().serialize()))
    io, engine_layers = _engine_io(trt, logger, data)
    facts = {"gpu_name": gpu_name, "compute_capability": capability, "build_seconds": round(build_seconds, 3),
             "network_layers": int(network.num_layers), "engine_layers": engine_layers, "io": io}
    return _write_engine(trt, plan, data, facts, lines)


def _build_logger(trt: Any, lines: list[str]) -> Any:
    """A TensorRT logger that keeps every line (for the build log) and forwards warnings and errors."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            lines.append(f"[{severity.name if hasattr(severity, 'name') else severity}] {msg}")
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _parse_network(trt: Any, builder: Any, logger: Any, plan: BuildPlan) -> tuple[Any, Any]:
    """The network definition parsed from the plan's ONNX file (strongly typed when the plan says), and
    the parser, which the caller keeps alive until the build is done (it owns weights the network uses)."""
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if plan.typing == STRONGLY_TYPED and strongly_typed is not None:
        flags |= 1 << int(strongly_typed)  # TensorRT 11 is always strongly typed and may lack the flag
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{plan.onnx_path}: the TensorRT ONNX parser failed: {errors}")
    return network, parser


def _builder_config(trt: Any, builder: Any, network: Any, plan: BuildPlan) -> Any:
    """Workspace, FP16 flag (with pinned pre/post-processing), the batch profile and the timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_gb * (1 << 30)))
    if plan.typing == FP16_FLAG:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        pinned = _pin_outside_unets_to_fp32(trt, network)
        log.info("FP16 builder flag; %d pre/post-processing layers pinned to fp32", pinned)
    profile = builder.create_optimization_profile()
    shapes = plan.profile()
    profile.set_shape(graph.INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if plan.timing_cache is not None:
        previous = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
        cache = config.create_timing_cache(previous)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("%s was written for another GPU or TensorRT: starting a fresh timing cache", plan.timing_cache)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        else:
            log.info("timing cache %s: %d bytes reused", plan.timing_cache, len(previous))
    return config


def _engine_io(trt: Any, logger: Any, data: bytes) -> tuple[list[dict[str, Any]], int | None]:
    """The built engine's I/O tensors (as the sidecar records them) and its layer count."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io.append({
            "name": name,
            "mode": "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output",
            "dtype": str(engine.get_tensor_dtype(name)).replace("DataType.", "").lower(),
            "shape": [int(d) for d in engine.get_tensor_shape(name)],
        })
    engine_layers = getattr(engine, "num_layers", None)
    return io, int(engine_layers) if engine_layers is not None else None


def _write_engine(trt: Any, plan: BuildPlan, data: bytes, facts: dict[str, Any], lines: list[str]) -> BuildReport:
    """Writes the engine (atomically), its sidecar and its build log."""
    import hashlib

    from engine.hashing import file_sha256

    atomic_write(plan.out_path, data, make_parents=True)
    sidecar = EngineSidecar(
        tensorrt_version=trt.__version__,
        onnx_path=str(plan.onnx_path.resolve()),
        onnx_sha256=file_sha256(plan.onnx_path),
        precision=plan.precision,
        typing=plan.typing,
        profile=plan.profile(),
        engine_size=len(data),
        engine_sha256=hashlib.sha256(data).hexdigest(),
        metadata=plan.metadata,
        workspace_gb=plan.workspace_gb,
        timing_cache=str(plan.timing_cache) if plan.timing_cache else None,
        built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **facts,
    )
    side = write_sidecar(plan.out_path, sidecar)
    log_path = plan.out_path.with_name(plan.out_path.name + ".build.log")
    log_path.write_text("\n".join(lines) + "\n")
    report = BuildReport(plan.out_path, side, log_path, sidecar)
    log.info(report.summary())
    return report


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: Any) -> None:
    from toolchain import build_openvino

    parser.add_argument("--target", choices=("tensorrt", "openvino"), default="tensorrt",
                        help="tensorrt (a GPU engine, default) or openvino (an IR for the CPU: see below)")
    parser.add_argument("--onnx", required=True, type=Path, help="the exported inspection graph")
    parser.add_argument("--out", required=True, type=Path, help="file to write (.engine/.plan; .xml for openvino)")
    parser.add_argument("--precision", choices=("fp16", "fp32", "bf16", "int8"), default=None,
                        help="tensorrt: fp16 (default) or fp32; openvino: bf16 (default), fp32 or int8")
    parser.add_argument("--min-batch", type=int, default=1, help="smallest batch of the profile (default 1)")
    parser.add_argument("--opt-batch", type=int, default=8, help="batch the kernels are tuned for (default 8)")
    parser.add_argument("--max-batch", type=int, default=32, help="largest batch of the profile (default 32)")
    parser.add_argument("--timing-cache", type=Path, help="timing cache file, reused and updated across builds")
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace limit in GiB (default 4)")
    build_openvino.add_arguments(parser)


def run(args: Any) -> int:
    if args.target == "openvino":
        from toolchain import build_openvino

        return build_openvino.run(args)
    args.precision = args.precision or "fp16"
    if args.precision not in ("fp16", "fp32"):
        raise ValueError(f"--precision {args.precision} is for --target openvino; a TensorRT engine is fp16 or fp32")
    try:
        import tensorrt as trt

        has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    except ImportError:
        trt = None
        has_fp16_flag = True
    plan = plan_build(
        args.onnx, args.out, args.precision, args.min_batch, args.opt_batch, args.max_batch,
        args.workspace_gb, args.timing_cache, has_fp16_flag,
    )
    if trt is None:
        raise CLIError(
            "TensorRT is not installed here: engine build needs TensorRT and the NVIDIA GPU the engine will run on "
            "(pip install 'strip-inspection[gpu]'). The request itself is valid: "
            f"{plan.precision} ({plan.typing}), batch {plan.min_batch}/{plan.opt_batch}/{plan.max_batch}"
        )
    report = build_engine(plan)
    print(report.summary())
    print(f"sidecar: {sidecar_path(report.engine_path)}")
    return 0
