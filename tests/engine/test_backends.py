"""The ONNX Runtime and torch backends: same frames, same answers; clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.backends import BackendUnavailable, load_backend
from engine.backends.onnxruntime import choose_providers
from engine.devices import resolve_torch_device
from engine.rle import decode, encode
from toolchain.parity import FP32_TOLERANCE, compare_outputs


@pytest.fixture(scope="module")
def torch_reference(tiny_pt: Path, tiny_frames: np.ndarray):
    with load_backend(tiny_pt, device="cpu", precision="fp32", with_probs=True) as backend:
        return backend.infer(tiny_frames)


def test_onnxruntime_and_torch_agree(tiny_onnx: Path, tiny_frames: np.ndarray, torch_reference) -> None:
    """Same frames through both backends, FP32 tolerance (toolchain.parity: masks identical away from the
    1e-3 band around each threshold, counts consistent with masks)."""
    with load_backend(tiny_onnx, device="cpu", backend="onnxruntime", threads=1) as backend:
        description = backend.describe()
        assert description.pop("postprocess").startswith("fast")  # engine.fastpost (tests/engine/test_fastpost.py)
        assert description == {
            "backend": "onnxruntime", "device": "cpu", "precision": "fp32",
            "providers": ["CPUExecutionProvider"], "threads": 1,
        }
        result = backend.infer(tiny_frames)
    meta = backend.metadata
    report = compare_outputs(
        torch_reference, result, meta.thresholds, meta.min_areas, FP32_TOLERANCE, "torch", "onnxruntime"
    )
    assert report.passed, report.summary()
    assert result.masks.dtype == np.uint8 and result.counts.dtype == np.int32 and result.present.dtype == np.bool_
    assert result.masks.shape == (6, 4, 64, 320) and result.probs is None


def test_probabilities_agree(tiny_run: Path, tmp_path: Path, tiny_frames: np.ndarray, torch_reference) -> None:
    """With the debugging output: ORT and torch probabilities within 1e-4 (float32 summation order)."""
    from trainer.export import export_onnx

    export_onnx(tiny_run, tmp_path / "probs.onnx", with_probs=True, parity_frames=0)
    with load_backend(tmp_path / "probs.onnx", device="cpu", backend="onnxruntime") as backend:
        result = backend.infer(tiny_frames)
    assert result.probs is not None and result.probs.dtype == np.float32
    assert np.abs(result.probs - torch_reference.probs).max() <= 1e-4
    thresholds = np.asarray(backend.metadata.thresholds, np.float32).reshape(1, -1, 1, 1)
    assert np.array_equal(result.masks, (result.probs >= thresholds).astype(np.uint8))


def test_backend_rle_equals_engine_rle(tiny_onnx: Path, tiny_frames: np.ndarray, torch_reference) -> None:
    with load_backend(tiny_onnx, device="cpu", backend="onnxruntime") as backend:
        result = backend.infer(tiny_frames)
    for res in (result, torch_reference):
        rles = res.rle()
        assert len(rles) == len(tiny_frames) and all(len(row) == 4 for row in rles)
        for i in range(len(tiny_frames)):
            for k in range(4):
                assert rles[i][k] == encode(res.masks[i, k])
                assert np.array_equal(decode(rles[i][k], 64, 320), res.masks[i, k])
    assert any(r for row in rles for r in row) and any(not r for row in rles for r in row)


def test_batch_of_one_and_torch_tensor_input(tiny_onnx: Path, tiny_frames: np.ndarray, torch_reference) -> None:
    """The dynamic batch axis: one frame, or a torch tensor, gives that frame's answer (FP32 tolerance)."""
    import torch

    with load_backend(tiny_onnx, device="cpu", backend="onnxruntime") as backend:
        single = backend.infer(tiny_frames[2:3])
        from_tensor = backend.infer(torch.from_numpy(tiny_frames[:2]))
    meta = backend.metadata
    for result, index in ((single, slice(2, 3)), (from_tensor, slice(0, 2))):
        report = compare_outputs(
            torch_reference.subset(index), result, meta.thresholds, meta.min_areas, FP32_TOLERANCE
        )
        assert report.passed and len(result) == report.frames, report.summary()


def test_torch_backend_loads_a_fold_checkpoint(tiny_run: Path, tiny_frames: np.ndarray) -> None:
    from engine.hashing import file_sha256

    checkpoint = tiny_run / "fold1" / "best.pt"
    with load_backend(checkpoint, device="cpu", with_probs=True) as backend:
        result = backend.infer(tiny_frames[:2])
    meta = backend.metadata
    assert meta.folds == 1 and meta.checkpoint_sha256 == [file_sha256(checkpoint)]
    # A bare checkpoint carries no tuned post-processing: the thesis rule applies.
    assert meta.thresholds == [0.5] * 4 and meta.min_areas == [200] * 4
    assert np.array_equal(result.masks, (result.probs >= 0.5).astype(np.uint8))
    assert np.array_equal(result.present, result.counts >= 200)


def test_frames_are_validated(tiny_onnx: Path, tiny_pt: Path) -> None:
    for path in (tiny_onnx, tiny_pt):
        with load_backend(path, device="cpu") as backend:
            with pytest.raises(ValueError, match="frames must be uint8, got float32"):
                backend.infer(np.zeros((1, 64, 320), np.float32))
            with pytest.raises(ValueError, match=r"shape \[N, 64, 320\] .* got \[1, 64, 300\]"):
                backend.infer(np.zeros((1, 64, 300), np.uint8))
            with pytest.raises(ValueError, match=r"got \[64, 320\]"):
                backend.infer(np.zeros((64, 320), np.uint8))


def test_bad_model_files(tmp_path: Path, tiny_onnx: Path) -> None:
    import onnx

    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_backend(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match=r"unknown model file type '\.h5'"):
        load_backend(tmp_path / "model.h5")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf at all" * 10)
    with pytest.raises(ValueError, match="garbage.onnx: ONNX Runtime cannot load this model"):
        load_backend(garbage, device="cpu", backend="onnxruntime")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny_onnx.read_bytes()[: tiny_onnx.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.onnx: ONNX Runtime cannot load this model"):
        load_backend(truncated, device="cpu", backend="onnxruntime")
    # A valid ONNX model that is not an inspection graph.
    model = onnx.load(str(tiny_onnx))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(ValueError, match="carries no inspection metadata"):
        load_backend(foreign, device="cpu", backend="onnxruntime")
    corrupt_pt = tmp_path / "corrupt.pt"
    corrupt_pt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="corrupt.pt: not a readable torch checkpoint"):
        load_backend(corrupt_pt, device="cpu")


def test_options_are_checked(tiny_onnx: Path, tiny_pt: Path) -> None:
    with pytest.raises(ValueError, match="threads must be >= 0"):
        load_backend(tiny_onnx, device="cpu", backend="onnxruntime", threads=-1)
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        load_backend(tiny_onnx, device="gpu")
    with pytest.raises(ValueError, match="precision fp16 needs CUDA"):
        load_backend(tiny_pt, device="cpu", precision="fp16")
    with pytest.raises(TypeError):
        load_backend(tiny_onnx, device="cpu", backend="onnxruntime", no_such_option=1)


def test_device_choice_for_onnxruntime() -> None:
    cpu_only = ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("auto", cpu_only) == ("cpu", ["CPUExecutionProvider"])
    assert choose_providers("auto", gpu) == (
        "cuda:0", [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    )
    device, chain = choose_providers("cuda:1", gpu, provider="tensorrt", cache_dir="/models/m.onnx.ort-trt-cache")
    assert device == "cuda:1" and chain[0] == (
        "TensorrtExecutionProvider",
        {"device_id": 1, "trt_engine_cache_enable": True, "trt_engine_cache_path": "/models/m.onnx.ort-trt-cache"},
    )
    assert chain[1:] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="provider 'cpu' contradicts device 'cuda'"):
        choose_providers("cuda", gpu, provider="cpu")
    with pytest.raises(BackendUnavailable, match="no CUDAExecutionProvider .* install onnxruntime-gpu"):
        choose_providers("cuda", cpu_only)
    with pytest.raises(BackendUnavailable, match="no TensorrtExecutionProvider"):
        choose_providers("auto", cpu_only, provider="tensorrt")


def test_device_choice_for_torch() -> None:
    assert resolve_torch_device("auto", cuda_available=False) == "cpu"
    assert resolve_torch_device("auto", cuda_available=True) == "cuda:0"
    assert resolve_torch_device("cuda:1", cuda_available=True, cuda_count=2) == "cuda:1"
    with pytest.raises(BackendUnavailable, match="sees no CUDA GPU .* or use device='cpu'"):
        resolve_torch_device("cuda", cuda_available=False)
    with pytest.raises(BackendUnavailable, match="sees only 1 CUDA device"):
        resolve_torch_device("cuda:3", cuda_available=True, cuda_count=1)


def test_asking_for_a_missing_gpu_says_how_to_fix(tiny_onnx: Path, tiny_pt: Path) -> None:
    import onnxruntime
    import torch

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailable, match="install onnxruntime-gpu"):
            load_backend(tiny_onnx, device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
            load_backend(tiny_pt, device="cuda")
        with load_backend(tiny_pt) as backend:  # auto falls back to the CPU
            from engine.cpu import supports_bf16

            # The CPU default: bf16 autocast where the CPU has native bf16 (engine.cpu), else fp32.
            assert backend.device == "cpu" and backend.precision == ("bf16" if supports_bf16() else "fp32")


def test_torch_rle_equals_numpy_rle() -> None:
    """The device RLE path (run boundaries by torch, one host copy) on CPU tensors: same strings."""
    import torch

    from engine.rle import encode_batch, encode_batch_torch

    rng = np.random.default_rng(11)
    for density in (0.0, 0.02, 0.5, 1.0):
        masks = (rng.random((3, 4, 16, 40)) < density).astype(np.uint8)
        masks[0, 1] = 0
        masks[2, 3, :, 5:9] = 1
        assert encode_batch_torch(torch.from_numpy(masks)) == encode_batch(masks)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        encode_batch_torch(torch.zeros(4, 16, 40, dtype=torch.uint8))
