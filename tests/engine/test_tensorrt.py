"""TensorRT: engine build and backend.

The first half runs everywhere: build planning (precision by TensorRT release), the sidecar, the
version/GPU compatibility check, the batch-profile check, and the errors a machine without
TensorRT gives. The second half (marked ``trt``) builds and runs real engines; it is skipped with
the reason on machines without TensorRT and a CUDA GPU.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from engine.backends import BackendUnavailable, load_backend
from engine.backends.tensorrt import (
    check_batch,
    check_compatibility,
    read_sidecar,
    rebuild_command,
    sidecar_path,
)
from engine.cli_util import run_cli
from tests.fixtures import write_engine_with_sidecar
from toolchain.build import FP16_FLAG, STRONGLY_TYPED, choose_typing, plan_build
from toolchain.parity import FP16_TOLERANCE, compare_outputs

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _engine_cli(argv: list[str]) -> int:
    return run_cli("engine", "test", {"build": "toolchain.build"}, ["build", *argv])


# --------------------------------------------------------------------------- planning a build


def test_precision_by_tensorrt_release() -> None:
    # TensorRT 10 (has the FP16 flag) and 11 (strongly typed only).
    assert choose_typing("fp16", "fp16", has_fp16_flag=True) == STRONGLY_TYPED
    assert choose_typing("fp16", "fp16", has_fp16_flag=False) == STRONGLY_TYPED
    assert choose_typing("fp32", "fp32", has_fp16_flag=False) == STRONGLY_TYPED
    assert choose_typing("fp32", "fp16", has_fp16_flag=True) == FP16_FLAG
    with pytest.raises(ValueError, match="no FP16 builder flag .* 'trainer export --precision fp16"):
        choose_typing("fp32", "fp16", has_fp16_flag=False, onnx_path="m.onnx")
    with pytest.raises(ValueError, match="m.onnx is an FP16 graph; an fp32 engine needs the FP32 export"):
        choose_typing("fp16", "fp32", has_fp16_flag=True, onnx_path="m.onnx")


def test_build_plan_validates_flags(tiny_onnx: Path, tmp_path: Path) -> None:
    plan = plan_build(tiny_onnx, tmp_path / "m.engine", "fp16", 2, 4, 16, 2.0, tmp_path / "timing.cache")
    assert plan.typing == FP16_FLAG and plan.metadata.precision == "fp16"
    assert plan.profile() == {"min": [2, 64, 320], "opt": [4, 64, 320], "max": [16, 64, 320]}
    with pytest.raises(ValueError, match="1 <= --min-batch <= --opt-batch <= --max-batch, got 4 / 2 / 8"):
        plan_build(tiny_onnx, tmp_path / "m.engine", min_batch=4, opt_batch=2, max_batch=8)
    with pytest.raises(ValueError, match="must end in .engine or .plan"):
        plan_build(tiny_onnx, tmp_path / "m.trt")
    with pytest.raises(FileNotFoundError, match="--onnx .*absent.onnx: no such file"):
        plan_build(tmp_path / "absent.onnx", tmp_path / "m.engine")
    with pytest.raises(ValueError, match="--workspace-gb must be positive"):
        plan_build(tiny_onnx, tmp_path / "m.engine", workspace_gb=0)


@pytest.mark.skipif(HAVE_TENSORRT, reason="checks the message on machines without TensorRT")
def test_build_without_tensorrt_says_so(tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _engine_cli(["--onnx", str(tiny_onnx), "--out", str(tmp_path / "m.engine")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed here" in err and "strip-inspection[gpu]" in err
    assert "fp16 (fp16-builder-flag), batch 1/8/32" in err
    assert not (tmp_path / "m.engine").exists()
    # Flag errors come first, whatever the machine.
    assert _engine_cli(["--onnx", str(tiny_onnx), "--out", str(tmp_path / "m.engine"), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


# --------------------------------------------------------------------------- sidecar and compatibility


def test_sidecar_round_trip(tiny_onnx: Path, tmp_path: Path) -> None:
    engine = write_engine_with_sidecar(tmp_path / "model.engine", tiny_onnx)
    assert sidecar_path(engine) == tmp_path / "model.engine.json"
    sidecar = read_sidecar(engine)
    assert sidecar.batch_range == (1, 32) and sidecar.metadata.num_classes == 4
    assert read_sidecar(engine).to_dict() == json.loads(sidecar_path(engine).read_text())
    data = json.loads(sidecar_path(engine).read_text())
    del data["compute_capability"]
    sidecar_path(engine).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="engine sidecar lacks compute_capability; rebuild"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not an engine sidecar"):
        read_sidecar(engine)


def test_compatibility_check(tiny_onnx: Path, tmp_path: Path) -> None:
    engine = write_engine_with_sidecar(tmp_path / "model.engine", tiny_onnx)
    sidecar = read_sidecar(engine)
    rebuild = rebuild_command(engine, sidecar)
    assert rebuild == (
        f"engine build --onnx {tiny_onnx} --out {engine} --precision fp16 --min-batch 1 --opt-batch 8 --max-batch 32"
    )
    # Same release (build number aside), same GPU: fine.
    assert check_compatibility(engine, sidecar, "10.8.0.99", "NVIDIA A10", "8.6") == []
    with pytest.raises(BackendUnavailable) as err:
        check_compatibility(engine, sidecar, "10.9.0.34", "NVIDIA A10", "8.6")
    assert "built for TensorRT 10.8.0.43, but this machine has TensorRT 10.9.0.34" in str(err.value)
    assert f"rebuild it on this machine with: {rebuild}" in str(err.value)
    with pytest.raises(BackendUnavailable) as err:
        check_compatibility(engine, sidecar, "11.0.0.1", "NVIDIA H100 80GB HBM3", "9.0")
    message = str(err.value)
    assert "TensorRT 10.8.0.43, but this machine has TensorRT 11.0.0.1" in message
    assert "NVIDIA A10 (compute capability 8.6), but this GPU is a NVIDIA H100 80GB HBM3 (compute capability 9.0)" in message
    # Same architecture, other model: a warning, not a refusal.
    (warning,) = check_compatibility(engine, sidecar, "10.8.0.43", "NVIDIA A40", "8.6")
    assert "built on a NVIDIA A10; this is a NVIDIA A40 of the same compute capability" in warning


def test_batch_outside_profile() -> None:
    check_batch(1, (1, 32))
    check_batch(32, (1, 32))
    with pytest.raises(ValueError, match=r"batch of 33 frames is outside m.engine's optimisation profile \(batch 1..32\)"):
        check_batch(33, (1, 32), "m.engine")
    with pytest.raises(ValueError, match="--min-batch 1 --max-batch 32"):
        check_batch(1, (4, 32), "m.engine")


@pytest.mark.skipif(HAVE_TENSORRT, reason="checks the message on machines without TensorRT")
def test_load_backend_without_tensorrt(tmp_path: Path, tiny_onnx: Path) -> None:
    bare = tmp_path / "x.engine"
    bare.write_bytes(b"\x00" * 64)
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed here .*strip-inspection\[gpu\].*ONNX Runtime backend"):
        load_backend(bare)
    with pytest.raises(BackendUnavailable, match="runs on a CUDA GPU only; use the .onnx model"):
        load_backend(bare, device="cpu")
    engine = write_engine_with_sidecar(tmp_path / "model.plan", tiny_onnx)
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed here"):
        load_backend(engine)


# --------------------------------------------------------------------------- real engines (TensorRT + GPU)


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Path:
    from trainer.export import export_onnx

    out = tmp_path_factory.mktemp("trt") / "model_fp16.onnx"
    export_onnx(tiny_run, out, precision="fp16")
    return out


@pytest.fixture(scope="module")
def fp16_engine(tmp_path_factory: pytest.TempPathFactory, fp16_onnx: Path) -> Path:
    from toolchain.build import build_engine

    out = tmp_path_factory.mktemp("trt") / "model.engine"
    cache = out.with_name("timing.cache")
    build_engine(plan_build(fp16_onnx, out, "fp16", 1, 4, 8, 1.0, cache, has_fp16_flag=False))
    return out


@pytest.mark.trt
def test_engine_matches_onnxruntime(fp16_engine: Path, tiny_onnx: Path, tiny_frames: np.ndarray) -> None:
    """TensorRT FP16 vs ONNX Runtime FP32 on the CPU, FP16 tolerance (toolchain.parity); device RLE
    equals the host encoder's."""
    from engine.rle import encode_batch

    with load_backend(tiny_onnx, device="cpu", backend="onnxruntime") as ort:
        reference = ort.infer(tiny_frames)
    with load_backend(fp16_engine) as backend:
        assert backend.precision == "fp16" and backend.max_batch_size == 8
        result = backend.infer(tiny_frames)
    meta = backend.metadata
    reference.probs = _reference_probs(tiny_onnx, tiny_frames)
    report = compare_outputs(
        reference, result, meta.thresholds, meta.min_areas, FP16_TOLERANCE, "onnxruntime fp32", "tensorrt fp16"
    )
    assert report.passed, report.summary()
    assert result.encoded is not None and result.rle() == encode_batch(result.masks)


def _reference_probs(onnx_path: Path, frames: np.ndarray) -> np.ndarray:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    # Expose the mean probabilities: they feed the threshold node, whose first input they are.
    threshold_node = next(n for n in model.graph.node if n.op_type == "GreaterOrEqual")
    model.graph.output.add(name=threshold_node.input[0])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([threshold_node.input[0]], {"frames": frames})[0]


@pytest.mark.trt
def test_cuda_graphs_and_device_input(fp16_engine: Path, tiny_frames: np.ndarray) -> None:
    import torch

    with load_backend(fp16_engine) as plain:
        expected = plain.infer(tiny_frames[:3])
    with load_backend(fp16_engine, cuda_graphs=True) as graphed:
        for _ in range(2):  # capture, then replay
            again = graphed.infer(tiny_frames[:3])
            assert np.array_equal(again.masks, expected.masks) and np.array_equal(again.counts, expected.counts)
        on_device = graphed.infer(torch.from_numpy(tiny_frames[:3]).cuda())
        assert np.array_equal(on_device.masks, expected.masks)
        single = graphed.infer(tiny_frames[:1])
        assert np.array_equal(single.counts, expected.counts[:1])


@pytest.mark.trt
def test_batch_outside_profile_raises(fp16_engine: Path) -> None:
    with load_backend(fp16_engine) as backend:
        with pytest.raises(ValueError, match=r"batch of 9 frames is outside .* \(batch 1..8\)"):
            backend.infer(np.zeros((9, 64, 320), np.uint8))


@pytest.mark.trt
def test_sidecar_and_timing_cache(fp16_engine: Path, fp16_onnx: Path) -> None:
    import tensorrt as trt

    from engine.hashing import file_sha256
    from toolchain.info import describe_model

    sidecar = read_sidecar(fp16_engine)
    assert sidecar.tensorrt_version == trt.__version__ and sidecar.typing == STRONGLY_TYPED
    assert sidecar.onnx_sha256 == file_sha256(fp16_onnx) and sidecar.engine_size == fp16_engine.stat().st_size
    assert fp16_engine.with_name("timing.cache").stat().st_size > 0
    assert fp16_engine.with_name("model.engine.build.log").is_file()
    info = describe_model(fp16_engine)
    assert info["io_source"] == "engine (deserialized here)"
    assert {t["name"] for t in info["io"]} == {"frames", "masks", "counts", "present"}


@pytest.mark.trt
def test_mismatched_sidecar_stops_with_rebuild_advice(fp16_engine: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "model.engine"
    shutil.copy(fp16_engine, copy)
    data = json.loads(sidecar_path(fp16_engine).read_text())
    data["tensorrt_version"] = "9.0.0.1"
    sidecar_path(copy).write_text(json.dumps(data))
    with pytest.raises(BackendUnavailable, match="built for TensorRT 9.0.0.1.*rebuild it on this machine with: engine build"):
        load_backend(copy)


@pytest.mark.trt
def test_fp32_graph_with_fp16_flag_on_tensorrt10(tiny_onnx: Path, tmp_path: Path, tiny_frames: np.ndarray) -> None:
    import tensorrt as trt

    from toolchain.build import build_engine

    if not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip(f"TensorRT {trt.__version__} has no FP16 builder flag (TensorRT 11+): covered by the FP16 graph")
    report = build_engine(plan_build(tiny_onnx, tmp_path / "flag.engine", "fp16", 1, 2, 4, 1.0))
    assert report.sidecar.typing == FP16_FLAG
    with load_backend(tmp_path / "flag.engine") as backend, load_backend(tiny_onnx, device="cpu", backend="onnxruntime") as ort:
        result, reference = backend.infer(tiny_frames[:4]), ort.infer(tiny_frames[:4])
    # Counts are pinned to fp32: each equals the sum of its own masks exactly.
    assert np.array_equal(result.counts, result.masks.sum(axis=(2, 3)))
    reference.probs = _reference_probs(tiny_onnx, tiny_frames[:4])
    parity = compare_outputs(
        reference, result, backend.metadata.thresholds, backend.metadata.min_areas, FP16_TOLERANCE
    )
    assert parity.passed, parity.summary()
