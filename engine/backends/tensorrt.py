"""TensorRT backend: a serialized engine (``.engine``/``.plan``) built by ``engine build``.

An engine is tied to the TensorRT version and the GPU it was built for, and carries none of the
model's metadata, so ``engine build`` writes a JSON sidecar next to it (``model.engine.json``):
TensorRT version, GPU name and compute capability, the ONNX file's sha256, the optimisation
profile, precision, the engine's own size and sha256, and the ONNX metadata. Loading checks the
engine against its sidecar and this machine first, and stops with a message saying how to rebuild.

Inference uses the named-tensor API (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) on the backend's own CUDA stream, with torch CUDA tensors as device buffers
(allocated once at the profile's maximum batch; a batch of n uses their first n rows, so
addresses never change), pinned host staging for numpy frames and results, and optionally one
captured CUDA graph per batch size.

Everything above the class is pure Python, testable on machines without TensorRT or a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import graph
from engine.backends.base import Backend, InspectionResult, check_frames, result_from_outputs
from engine.devices import BackendUnavailable, parse_device
from engine.files import atomic_write
from engine.hashing import file_digest
from engine.metadata import ModelMetadata
from engine.rle import encode_batch_torch

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "strip-inspection/engine-sidecar/1"
INSTALL_HINT = (
    "install TensorRT on a machine with an NVIDIA GPU (pip install 'strip-inspection[gpu]', which brings "
    "tensorrt and onnxruntime-gpu), or run the .onnx model with the ONNX Runtime backend instead"
)


def sidecar_path(engine_path: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


@dataclass
class EngineSidecar:
    """What ``engine build`` records next to an engine (see the module docstring)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnx_path: str
    onnx_sha256: str
    precision: str
    typing: str
    profile: dict[str, list[int]]
    engine_size: int
    engine_sha256: str
    metadata: ModelMetadata
    build_seconds: float | None = None
    network_layers: int | None = None
    engine_layers: int | None = None
    workspace_gb: float | None = None
    timing_cache: str | None = None
    io: list[dict[str, Any]] = field(default_factory=list)
    built_at: str | None = None
    format: str = SIDECAR_FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["metadata"] = self.metadata.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "sidecar") -> EngineSidecar:
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"{source}: not an engine sidecar (expected format {SIDECAR_FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{source}: engine sidecar lacks {', '.join(missing)}; rebuild the engine with 'engine build'")
        fields = {k: v for k, v in data.items() if k in names}
        fields["metadata"] = ModelMetadata.from_dict(data["metadata"])
        for key in ("min", "opt", "max"):
            if key not in fields["profile"]:
                raise ValueError(f"{source}: engine sidecar profile lacks {key!r}")
        return cls(**fields)

    @property
    def batch_range(self) -> tuple[int, int]:
        return int(self.profile["min"][0]), int(self.profile["max"][0])


def write_sidecar(engine_path: str | Path, sidecar: EngineSidecar) -> Path:
    return atomic_write(sidecar_path(engine_path), json.dumps(sidecar.to_dict(), indent=2))


def read_sidecar(engine_path: str | Path) -> EngineSidecar:
    """Reads and validates ``<engine>.json``.

    Raises:
        FileNotFoundError: no sidecar (the engine was not built by ``engine build``).
        ValueError: unreadable or incomplete sidecar.
    """
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no sidecar next to the engine; it carries the model's metadata and build facts. "
            f"Build engines with 'engine build --onnx model.onnx --out {Path(engine_path).name}'"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt engine sidecar (not JSON: {exc}); rebuild the engine") from exc
    return EngineSidecar.from_dict(data, source=str(path))


def verify_engine_file(engine_path: str | Path, sidecar: EngineSidecar) -> None:
    """Raises ValueError when the engine file is not the one its sidecar describes (truncated, corrupt, replaced)."""
    engine_path = Path(engine_path)
    size, sha = file_digest(engine_path)
    if size != sidecar.engine_size:
        raise ValueError(
            f"{engine_path}: {size} bytes, but its sidecar records {sidecar.engine_size}: the engine is truncated "
            f"or was replaced; rebuild it with: {rebuild_command(engine_path, sidecar)}"
        )
    if sha != sidecar.engine_sha256:
        raise ValueError(
            f"{engine_path}: sha256 {sha[:12]}... differs from its sidecar's {sidecar.engine_sha256[:12]}...: the "
            f"engine is corrupt or was replaced; rebuild it with: {rebuild_command(engine_path, sidecar)}"
        )


def rebuild_command(engine_path: str | Path, sidecar: EngineSidecar) -> str:
    lo, hi = sidecar.batch_range
    opt = int(sidecar.profile["opt"][0])
    return (
        f"engine build --onnx {sidecar.onnx_path} --out {engine_path} --precision {sidecar.precision} "
        f"--min-batch {lo} --opt-batch {opt} --max-batch {hi}"
    )


def _release(version: str) -> tuple[int, ...]:
    """``"10.8.0.43"`` -> ``(10, 8, 0)``: engines are tied to the release, not the build number."""
    parts = []
    for token in version.split(".")[:3]:
        digits = "".join(ch for ch in token if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_compatibility(
    engine_path: str | Path,
    sidecar: EngineSidecar,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
) -> list[str]:
    """Checks an engine's sidecar against this machine.

    Returns:
        warnings (same compute capability on a different GPU model: runs, possibly slower).

    Raises:
        BackendUnavailable: other TensorRT release or other compute capability; says how to rebuild.
    """
    problems = []
    if _release(sidecar.tensorrt_version) != _release(tensorrt_version):
        problems.append(f"TensorRT {sidecar.tensorrt_version}, but this machine has TensorRT {tensorrt_version}")
    if sidecar.compute_capability != compute_capability:
        problems.append(
            f"a {sidecar.gpu_name} (compute capability {sidecar.compute_capability}), but this GPU is a "
            f"{gpu_name} (compute capability {compute_capability})"
        )
    if problems:
        raise BackendUnavailable(
            f"{engine_path} was built for {' and for '.join(problems)}. TensorRT engines only run on the "
            f"TensorRT release and GPU architecture they were built for: rebuild it on this machine with: "
            f"{rebuild_command(engine_path, sidecar)}"
        )
    if sidecar.gpu_name != gpu_name:
        return [
            f"{engine_path} was built on a {sidecar.gpu_name}; this is a {gpu_name} of the same compute "
            f"capability: it runs, but rebuilding here may be faster ({rebuild_command(engine_path, sidecar)})"
        ]
    return []


def check_batch(n: int, batch_range: tuple[int, int], engine_path: str | Path = "engine") -> None:
    """Raises ValueError when a batch of ``n`` frames is outside the engine's optimisation profile."""
    lo, hi = batch_range
    if not lo <= n <= hi:
        raise ValueError(
            f"a batch of {n} frames is outside {engine_path}'s optimisation profile (batch {lo}..{hi}); split the "
            f"batch, or rebuild the engine with 'engine build --min-batch {min(lo, n)} --max-batch {max(hi, n)}'"
        )


def gpu_identity(device_index: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of a CUDA device, via torch."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return torch.cuda.get_device_name(device_index), f"{major}.{minor}"


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT is not installed here ({exc}): {INSTALL_HINT}") from exc
    return trt


def _cuda_device_index(device: str) -> int:
    parsed = parse_device(device)
    if parsed.is_cpu:
        raise BackendUnavailable("a TensorRT engine runs on a CUDA GPU only; use the .onnx model for device='cpu'")
    return parsed.index


def _torch_with_gpu(index: int) -> Any:
    """torch, once it is known to see CUDA device ``index`` (its tensors are the engine's buffers)."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(f"the TensorRT backend uses torch CUDA tensors as buffers: {exc}") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "the TensorRT backend needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is "
            "False): run on a machine with an NVIDIA GPU and a CUDA build of torch, or use the .onnx model"
        )
    if index >= torch.cuda.device_count():
        raise BackendUnavailable(f"device cuda:{index} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    return torch


# --------------------------------------------------------------------------- the backend


class TensorRTBackend(Backend):
    """Runs a TensorRT engine built by ``engine build``.

    Args:
        path: the ``.engine``/``.plan`` file (its ``.json`` sidecar must lie next to it).
        device: ``auto``/``cuda``/``cuda:N``.
        cuda_graphs: capture one CUDA graph per batch size on first use and replay it afterwards
            (saves the per-kernel launch cost; worthwhile at small batches).
        verify: check the engine file's sha256 against the sidecar before loading.
        device_rle: find the masks' RLE run boundaries on the GPU (one copy per batch) and
            attach the strings to the result.
    """

    name = "tensorrt"

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        cuda_graphs: bool = False,
        verify: bool = True,
        device_rle: bool = True,
    ) -> None:
        self.path = Path(path)
        index = _cuda_device_index(device)
        trt = import_tensorrt()
        self.sidecar = read_sidecar(self.path)
        if verify:
            verify_engine_file(self.path, self.sidecar)
        torch = _torch_with_gpu(index)
        gpu_name, capability = gpu_identity(index)
        for warning in check_compatibility(self.path, self.sidecar, trt.__version__, gpu_name, capability):
            log.warning(warning)

        self._torch = torch
        self._trt = trt
        self.device = f"cuda:{index}"
        self._gpu = torch.device("cuda", index)
        self.metadata = self.sidecar.metadata
        self.precision = self.sidecar.precision
        self.batch_range = self.sidecar.batch_range
        self.max_batch_size = self.batch_range[1]
        self._lock = threading.Lock()
        self._deserialize()
        self._check_io()
        self._allocate(self.max_batch_size)
        self.cuda_graphs = cuda_graphs
        self.device_rle = device_rle
        self._graphs: dict[int, Any] = {}
        self._bound_batch = 0
        log.info(
            "loaded %s on %s (%s, TensorRT %s, batch %d..%d%s)", self.path, self.device, self.precision,
            trt.__version__, *self.batch_range, ", CUDA graphs" if cuda_graphs else "",
        )

    # ------------------------------------------------------------------ set-up

    def _deserialize(self) -> None:
        """The engine, its execution context and the backend's own CUDA stream, on the backend's GPU."""
        torch, trt = self._torch, self._trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self._gpu):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise ValueError(
                    f"{self.path}: TensorRT could not deserialize this engine (see the TensorRT log above); rebuild "
                    f"it with: {rebuild_command(self.path, self.sidecar)}"
                )
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise RuntimeError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
            self._stream = torch.cuda.Stream(self._gpu)

    def _check_io(self) -> None:
        trt, engine = self._trt, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        graph.check_io(inputs, outputs, str(self.path), kind="inspection engine")
        profile_min, _, profile_max = engine.get_tensor_profile_shape(graph.INPUT_NAME, 0)
        engine_range = (int(profile_min[0]), int(profile_max[0]))
        if engine_range != self.batch_range:
            raise ValueError(
                f"{self.path}: the engine's profile (batch {engine_range}) differs from its sidecar's "
                f"{self.batch_range}: the sidecar belongs to another build; rebuild the engine"
            )
        self.output_names = outputs

    def _allocate(self, n_max: int) -> None:
        torch, trt, engine = self._torch, self._trt, self._engine
        c, (h, w) = self.metadata.num_classes, self.metadata.input_size
        shapes = graph.static_dims(c, h, w)
        self._frames = torch.empty((n_max, h, w), dtype=torch.uint8, device=self._gpu)
        self._frames_host = torch.empty((n_max, h, w), dtype=torch.uint8, pin_memory=True)
        self._outputs: dict[str, Any] = {}
        self._outputs_host: dict[str, Any] = {}
        for name in self.output_names:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
            self._outputs[name] = torch.empty((n_max, *shapes[name]), dtype=dtype, device=self._gpu)
            self._outputs_host[name] = torch.empty((n_max, *shapes[name]), dtype=dtype, pin_memory=True)

    def _bind(self, n: int) -> None:
        """Sets the batch size and the (fixed) buffer addresses on the execution context."""
        if n == self._bound_batch:
            return
        h, w = self.metadata.input_size
        if not self._context.set_input_shape(graph.INPUT_NAME, (n, h, w)):
            raise ValueError(f"{self.path}: TensorRT refused input shape {(n, h, w)} (profile {self.batch_range})")
        self._context.set_tensor_address(graph.INPUT_NAME, self._frames.data_ptr())
        for name, tensor in self._outputs.items():
            self._context.set_tensor_address(name, tensor.data_ptr())
        self._bound_batch = n

    def _execute(self, n: int) -> None:
        torch = self._torch
        if not self.cuda_graphs:
            self._bind(n)
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"{self.path}: TensorRT execution failed for a batch of {n} (see the TensorRT log)")
            return
        captured = self._graphs.get(n)
        if captured is None:
            self._bind(n)
            # The first run lets TensorRT finish lazy allocations that a capture must not contain.
            ok = self._context.execute_async_v3(self._stream.cuda_stream)
            self._stream.synchronize()
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured, stream=self._stream):
                ok = ok and self._context.execute_async_v3(self._stream.cuda_stream)
            if not ok:
                raise RuntimeError(f"{self.path}: TensorRT execution failed while capturing a CUDA graph for batch {n}")
            self._graphs[n] = captured
            self._bound_batch = 0  # capture may leave the context in a state a plain run must re-set
        with torch.cuda.stream(self._stream):
            captured.replay()

    # ------------------------------------------------------------------ inference

    def infer(self, frames: Any) -> InspectionResult:
        torch = self._torch
        check_frames(frames, self.metadata)
        n = int(frames.shape[0])
        check_batch(n, self.batch_range, self.path)
        with self._lock, torch.cuda.device(self._gpu):
            # Frames already on the GPU may still be being written on the caller's stream.
            self._stream.wait_stream(torch.cuda.current_stream(self._gpu))
            return self._infer_on_stream(frames, n)

    def _infer_on_stream(self, frames: Any, n: int) -> InspectionResult:
        torch = self._torch
        with torch.cuda.stream(self._stream):
            if isinstance(frames, np.ndarray):
                staging = self._frames_host[:n]
                staging.numpy()[...] = frames
                self._frames[:n].copy_(staging, non_blocking=True)
            else:
                # Already a tensor (on this GPU, another one, or the host): one copy into the bound buffer.
                self._frames[:n].copy_(frames, non_blocking=True)
            self._execute(n)
            encoded = encode_batch_torch(self._outputs[graph.MASKS.name][:n]) if self.device_rle else None
            for name, tensor in self._outputs.items():
                self._outputs_host[name][:n].copy_(tensor[:n], non_blocking=True)
            self._stream.synchronize()
            # Copies: the pinned buffers are reused by the next call.
            host = {name: tensor[:n].numpy().copy() for name, tensor in self._outputs_host.items()}
        return result_from_outputs(host, encoded)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "tensorrt": self.sidecar.tensorrt_version,
            "batch": list(self.batch_range),
            "cuda_graphs": self.cuda_graphs,
        }

    def close(self) -> None:
        self._graphs.clear()
        self._context = None
        self._engine = None
        self._runtime = None
