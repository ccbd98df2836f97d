"""FLOPs per image, counted, and the device's peak FLOP/s, measured.

Two independent counts, one convention (a multiply-add is 2 FLOPs; only convolutions and matrix
products count: bias, batch norm, activations, pooling and resizes are left out, as torch's
``FlopCounterMode`` does):

* :func:`count_flops_torch` runs the eager module once under
  ``torch.utils.flop_counter.FlopCounterMode`` (``.pt`` models);
* :func:`count_flops_onnx` walks the ONNX graph after shape inference at batch 1 and adds up
  ``Conv``/``ConvTranspose``/``MatMul``/``Gemm`` (``.onnx`` models, and ``.engine`` files through
  the ONNX they were built from).

The peak is what a large matrix product reaches on the same device in the same run, so the
achieved fraction compares like with like on a shared or throttled machine.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.devices import is_cuda, parse_device

log = logging.getLogger(__name__)


@dataclass
class FlopCount:
    """FLOPs of one image through the whole inspection graph (all folds)."""

    flops_per_image: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PeakFlops:
    """Best FLOP/s of a ``size`` x ``size`` matrix product on ``device`` in ``dtype``."""

    device: str
    dtype: str
    size: int
    flops_per_s: float
    median_flops_per_s: float
    repeats: int
    threads: int | None
    method: str = "torch.matmul"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_flops_torch(module: Any, frames: Any) -> int:
    """FLOPs per image of ``module(frames)``, counted by ``FlopCounterMode`` (2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(frames)
    return int(counter.get_total_flops()) // int(frames.shape[0])


def _static_shapes(model: Any) -> dict[str, list[int]]:
    """Every tensor's shape after ONNX shape inference (unknown dims as -1)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    return shapes


def count_flops_onnx(path: str | Path) -> int:
    """FLOPs per image of an ONNX inspection graph: its convolutions and matrix products at batch 1.

    Raises:
        ValueError: a counted node's shapes cannot be inferred (the count would be wrong).
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    for graph_input in graph.input:
        if graph_input.name in initializer_names:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        if dims:
            # Fix the dynamic batch at 1 so every shape downstream is a number.
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    shapes = _static_shapes(model)

    def shape_of(name: str, node: Any) -> list[int]:
        shape = shapes.get(name)
        if shape is None or any(d < 0 for d in shape):
            raise ValueError(f"{path}: cannot infer the shape of {name!r} (input of {node.op_type} {node.name!r})")
        return shape

    total = 0
    for node in graph.node:
        if node.op_type == "Conv":
            w = shape_of(node.input[1], node)
            y = shape_of(node.output[0], node)
            total += 2 * math.prod(y) * math.prod(w[1:])
        elif node.op_type == "ConvTranspose":
            x = shape_of(node.input[0], node)
            w = shape_of(node.input[1], node)
            total += 2 * x[0] * math.prod(x[2:]) * math.prod(w)
        elif node.op_type in ("MatMul", "Gemm"):
            a = shape_of(node.input[0], node)
            y = shape_of(node.output[0], node)
            k = a[-1]
            if node.op_type == "Gemm" and any(attr.name == "transA" and attr.i for attr in node.attribute):
                k = a[0]
            total += 2 * math.prod(y) * k
    return total


def sibling(path: Path, suffix: str) -> Path | None:
    candidate = path.with_suffix(suffix)
    return candidate if candidate.is_file() else None


def model_flops(path: str | Path) -> FlopCount | None:
    """FLOPs per image of a model file, counted the way its format allows; None when it cannot be.

    ``.onnx``: graph walk. ``.pt``: ``FlopCounterMode`` on the eager ensemble. ``.engine``/``.plan``:
    the graph walk of the ``.onnx`` beside it (same stem), else the ``.pt`` beside it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return FlopCount(count_flops_onnx(path), "ONNX graph walk: Conv/ConvTranspose/MatMul/Gemm at batch 1")
    if suffix == ".pt":
        import torch

        from network.checkpoint import load_ensemble
        from network.inspection import InspectionModel

        folds, _, meta = load_ensemble(path)
        model = InspectionModel(folds, meta).eval()
        frames = torch.zeros((1, *meta.input_size), dtype=torch.uint8)
        return FlopCount(count_flops_torch(model, frames), "torch.utils.flop_counter.FlopCounterMode, eager fp32")
    if suffix == ".xml":
        from engine.backends.openvino_ir import build_info, read_model

        source = build_info(read_model(path)).get("onnx")
        if source and Path(source).is_file():
            count = model_flops(Path(source))
            if count is not None:
                count.method += f" (of {Path(source).name}, the IR's source)"
            return count
        return None
    if suffix in (".engine", ".plan"):
        for other in (".onnx", ".pt"):
            found = sibling(path, other)
            if found is not None:
                count = model_flops(found)
                if count is not None:
                    count.method += f" (of {found.name}, the engine's source)"
                return count
        log.info("%s: no .onnx or .pt beside it, FLOPs not counted", path)
    return None


def _sync(device: str) -> None:
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def measure_peak_flops(
    device: str = "cpu", dtype: str = "float32", size: int | None = None, seconds: float = 1.0, min_repeats: int = 3
) -> PeakFlops:
    """Times ``size`` x ``size`` matrix products on ``device`` for about ``seconds``; best and median FLOP/s.

    ``dtype`` is ``float32``, ``float16``, ``bfloat16`` or ``tf32`` (float32 data, TF32 tensor-core
    math: what cuDNN and ONNX Runtime CUDA use for fp32 convolutions by default, so it is the
    ceiling fp32 rows on CUDA are compared with). The default size (2048 on the CPU, 8192 on a GPU)
    is large enough to be compute bound.
    """
    import torch

    if dtype == "tf32":
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            peak = measure_peak_flops(device, "float32", size, seconds, min_repeats)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        peak.dtype = "tf32"
        return peak
    torch_dtype = getattr(torch, dtype)
    if size is None:
        size = 8192 if is_cuda(device) else 2048
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    with torch.inference_mode():
        torch.matmul(a, b)  # warm-up: allocation, kernel selection
        _sync(device)
        flops = 2 * size**3
        rates: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(rates) < min_repeats or time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.matmul(a, b)
            _sync(device)
            rates.append(flops / (time.perf_counter() - start))
            if len(rates) >= 200:
                break
    threads = torch.get_num_threads() if parse_device(device).is_cpu else None
    return PeakFlops(
        device=device,
        dtype=dtype,
        size=size,
        flops_per_s=max(rates),
        median_flops_per_s=statistics.median(rates),
        repeats=len(rates),
        threads=threads,
    )


def _time_op(run: Any, flops: int, seconds: float, min_repeats: int) -> list[float]:
    run()  # warm-up: allocation, kernel selection
    rates: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(rates) < min_repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        rates.append(flops / (time.perf_counter() - start))
        if len(rates) >= 200:
            break
    return rates


def _openvino_int8_matmul(size: int, threads: int) -> Any:
    """An OpenVINO int8 matrix product: FakeQuantize(activations) x int8 weights, which the CPU plugin
    runs as a u8 x i8 FullyConnected (VNNI / AMX-INT8)."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([size, size], ov.Type.f32, name="x")
    lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
    weights = ops.constant(np.random.default_rng(0).integers(-127, 127, (size, size), dtype=np.int8))
    dequantized = ops.multiply(ops.convert(weights, "f32"), ops.constant(np.float32(0.01)))
    y = ops.matmul(ops.fake_quantize(x, lo, hi, lo, hi, 256), dequantized, False, True)
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    request = ov.Core().compile_model(ov.Model([y], [x]), "CPU", config).create_infer_request()
    a = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    return lambda: request.infer([a])


def measure_int8_peak(size: int | None = None, seconds: float = 1.0, threads: int = 0, min_repeats: int = 3) -> PeakFlops:
    """The CPU's int8 matrix-product peak (int8 multiply-adds counted as 2 ops, like FLOPs).

    OpenVINO's int8 FullyConnected where openvino is installed (it uses VNNI/AMX-INT8: on the
    machine of issue 11 it ran about 2x torch._int_mm), else ``torch._int_mm``.
    """
    import importlib.util

    import torch

    size = size or 2048
    if importlib.util.find_spec("openvino") is not None:
        run, method = _openvino_int8_matmul(size, threads), "OpenVINO u8 x i8 FullyConnected"
    else:
        a = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        b = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        run, method = (lambda: torch._int_mm(a, b)), "torch._int_mm"
    with torch.inference_mode():
        rates = _time_op(run, 2 * size**3, seconds, min_repeats)
    return PeakFlops(device="cpu", dtype="int8", size=size, flops_per_s=max(rates),
                     median_flops_per_s=statistics.median(rates), repeats=len(rates),
                     threads=threads or torch.get_num_threads(), method=method)
