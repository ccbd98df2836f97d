"""CUDA paths of the torch and ONNX Runtime backends, and RLE on the device (marked ``gpu``: skipped
with the reason on machines without a CUDA GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.backends import load_backend
from engine.rle import encode_batch, encode_batch_torch
from toolchain.parity import FP16_TOLERANCE, compare_outputs

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cpu_reference(tiny_pt: Path, tiny_frames: np.ndarray):
    with load_backend(tiny_pt, device="cpu", with_probs=True) as backend:
        return backend.infer(tiny_frames)


def test_torch_cuda_fp16_matches_cpu_reference(tiny_pt: Path, tiny_frames: np.ndarray, cpu_reference) -> None:
    """fp16 + channels_last on CUDA vs fp32 on the CPU: FP16 tolerance (toolchain.parity)."""
    with load_backend(tiny_pt, device="auto", with_probs=True) as backend:
        assert backend.device == "cuda:0" and backend.precision == "fp16"
        result = backend.infer(tiny_frames)
    meta = backend.metadata
    report = compare_outputs(cpu_reference, result, meta.thresholds, meta.min_areas, FP16_TOLERANCE)
    assert report.passed, report.summary()
    assert result.encoded is not None and result.rle() == encode_batch(result.masks)


def test_torch_cuda_fp32_matches_cpu_reference(tiny_pt: Path, tiny_frames: np.ndarray, cpu_reference) -> None:
    """fp32 on CUDA vs the CPU; cuDNN may pick TF32 or other algorithms, so FP16 limits on probabilities
    (TF32 keeps 10 mantissa bits, like fp16) and the fp32 rule for counts."""
    import torch

    with load_backend(tiny_pt, device="cuda", precision="fp32", with_probs=True) as backend:
        result = backend.infer(torch.from_numpy(tiny_frames).cuda())
    meta = backend.metadata
    report = compare_outputs(cpu_reference, result, meta.thresholds, meta.min_areas, FP16_TOLERANCE)
    assert report.passed, report.summary()


def test_onnxruntime_cuda_with_io_binding(tiny_onnx: Path, tiny_frames: np.ndarray, cpu_reference) -> None:
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu (the '.[gpu]' extra)")
    with load_backend(tiny_onnx, device="cuda") as backend:
        assert backend.device == "cuda:0" and backend.providers[0] == "CUDAExecutionProvider"
        from_host = backend.infer(tiny_frames)
        from_device = backend.infer(torch.from_numpy(tiny_frames).cuda())
    meta = backend.metadata
    for result in (from_host, from_device):
        # cuDNN convolutions may use TF32: FP16 limits (see the torch fp32 test).
        report = compare_outputs(cpu_reference, result, meta.thresholds, meta.min_areas, FP16_TOLERANCE)
        assert report.passed, report.summary()
        assert result.rle() == encode_batch(result.masks)


def test_device_rle_equals_host_rle() -> None:
    import torch

    rng = np.random.default_rng(3)
    masks = (rng.random((8, 4, 256, 1600)) < 0.01).astype(np.uint8)
    masks[:, 2] = 0
    masks[0, 0, :, 10:20] = 1  # runs crossing column boundaries
    masks[1, 3] = 1  # a full mask: one run
    assert encode_batch_torch(torch.from_numpy(masks).cuda()) == encode_batch(masks)


def test_onnxruntime_tensorrt_provider(tiny_run: Path, tmp_path: Path, tiny_frames: np.ndarray, cpu_reference) -> None:
    import onnxruntime as ort

    from trainer.export import export_onnx

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no TensorrtExecutionProvider here (onnxruntime-gpu built with TensorRT needed)")
    export_onnx(tiny_run, tmp_path / "fp16.onnx", precision="fp16")
    with load_backend(tmp_path / "fp16.onnx", device="cuda", provider="tensorrt") as backend:
        assert backend.providers[0] == "TensorrtExecutionProvider"
        result = backend.infer(tiny_frames)
    meta = backend.metadata
    report = compare_outputs(cpu_reference, result, meta.thresholds, meta.min_areas, FP16_TOLERANCE)
    assert report.passed, report.summary()
    assert (tmp_path / "fp16.onnx.ort-trt-cache").is_dir()
