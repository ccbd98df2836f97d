"""The OpenVINO backend and ``engine build --target openvino`` on the tiny test model, with real OpenVINO/NNCF.

Tolerances (toolchain.parity): fp32 OpenVINO vs the torch fp32 reference: FP32_TOLERANCE (max |dprob| 1e-4,
no mask pixel away from the threshold differs); bf16 U-Nets vs the fp32 graph: BF16_TOLERANCE (max
|dprob| 0.1, mean 5e-3, <= 0.5 % of the pixels outside the 1e-2 band, mask Dice >= 0.9, labels agreeing
on >= 95 %); int8: INT8_TOLERANCE. Counts always equal the masks' sums (exact, in every precision).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toolchain.parity import BF16_TOLERANCE, FP32_TOLERANCE, compare_outputs, tolerance_for

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'strip-inspection[cpu]')")


@pytest.fixture(scope="module")
def reference(tiny_pt: Path, tiny_frames: np.ndarray):
    """The torch fp32 eager reference, with probabilities."""
    from engine.backends import load_backend

    with load_backend(tiny_pt, device="cpu", precision="fp32", with_probs=True) as backend:
        return backend.infer(tiny_frames)


@pytest.fixture(scope="module")
def openvino_fp32(tiny_onnx: Path, tiny_frames: np.ndarray):
    from engine.backends.openvino import OpenVinoBackend

    return OpenVinoBackend(tiny_onnx, precision="fp32", with_probs=True).infer(tiny_frames)


def test_fp32_matches_onnxruntime_and_the_reference(tiny_onnx: Path, tiny_frames: np.ndarray, reference,
                                                    openvino_fp32) -> None:
    from engine.backends import load_backend

    meta_backend = load_backend(tiny_onnx, device="cpu", backend="openvino", precision="fp32")
    assert (meta_backend.name, meta_backend.precision, meta_backend.device) == ("openvino", "fp32", "cpu")
    meta = meta_backend.metadata
    report = compare_outputs(reference, openvino_fp32, meta.thresholds, meta.min_areas, FP32_TOLERANCE,
                             "torch fp32", "openvino fp32")
    assert report.passed, report.summary()
    with load_backend(tiny_onnx, device="cpu", backend="onnxruntime") as ort:
        expected = ort.infer(tiny_frames)
    plain = meta_backend.infer(tiny_frames)
    np.testing.assert_array_equal(plain.masks, expected.masks)
    np.testing.assert_array_equal(plain.counts, expected.counts)
    np.testing.assert_array_equal(plain.present, expected.present)
    assert plain.masks.dtype == np.uint8 and plain.counts.dtype == np.int32 and plain.present.dtype == np.bool_
    assert plain.rle() == expected.rle()


def test_bf16_is_within_tolerance_and_counts_are_the_masks_sums(tiny_onnx: Path, tiny_frames: np.ndarray,
                                                                openvino_fp32, native_bf16) -> None:
    from engine.backends.openvino import OpenVinoBackend

    backend = OpenVinoBackend(tiny_onnx, precision="bf16", with_probs=True)
    result = backend.infer(tiny_frames)
    meta = backend.metadata
    report = compare_outputs(openvino_fp32, result, meta.thresholds, meta.min_areas, BF16_TOLERANCE,
                             "openvino fp32", "openvino bf16")
    assert report.passed, report.summary()
    assert report.max_prob_diff > 0  # bf16 really ran
    np.testing.assert_array_equal(result.masks.sum(axis=(2, 3)), result.counts)
    np.testing.assert_array_equal(result.present, result.counts >= np.asarray(meta.min_areas))
    # Without probabilities (what serves), the same decision.
    plain = OpenVinoBackend(tiny_onnx, precision="bf16").infer(tiny_frames)
    np.testing.assert_array_equal(plain.masks, result.masks)


def _runtime_precisions(compiled_request_stage) -> dict[str, str]:
    stage, request, _ = compiled_request_stage
    model = request.get_compiled_model().get_runtime_model()
    out = {}
    for op in model.get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) not in ("Input", "Output", "Const"):
            out[op.get_friendly_name()] = info["runtimePrecision"].astype(str)
    return out


def test_bf16_runs_only_the_unets_in_bf16(tiny_onnx: Path, native_bf16) -> None:
    """The trap: the bf16 hint on the whole graph runs cast, normalise, resizes and fold mean in bf16.
    The split keeps every node before and after the U-Nets in f32 and the U-Nets' convolutions in bf16."""
    from engine.backends.openvino import OpenVinoBackend

    backend = OpenVinoBackend(tiny_onnx, precision="bf16")
    pre, net, post = (_runtime_precisions(r) for r in backend.requests)
    assert [s.name for s in backend.stages] == ["pre", "net", "post"]
    assert "bf16" not in pre.values() and "bf16" not in post.values(), (pre, post)
    assert any("Sigmoid" in name or "GreaterOrEqual" in name for name in post)
    convs = [p for name, p in net.items() if "/Conv" in name]
    # OpenVINO keeps a convolution of a 1-channel input (the first of each U-Net) in f32; the rest are bf16.
    assert convs and convs.count("bf16") >= 0.8 * len(convs), convs
    whole = ov.Core().compile_model(str(tiny_onnx), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    leaked = [op.get_friendly_name() for op in whole.get_runtime_model().get_ordered_ops()
              if op.get_friendly_name() in ("/Cast", "/AveragePool", "/Resize")
              and op.get_rt_info()["runtimePrecision"].astype(str) == "bf16"]
    assert leaked, "the plain bf16 hint no longer runs pre/post-processing in bf16: the split may be unneeded"


def test_auto_choice_and_forcing_a_backend(tiny_onnx: Path, tiny_pt: Path, monkeypatch) -> None:
    from engine.backends import choose_backend, load_backend
    from engine.cpu import supports_bf16

    name, why = choose_backend(tiny_onnx, "cpu")
    assert name == ("openvino" if supports_bf16() else "onnxruntime") and name in why
    with load_backend(tiny_onnx, device="auto") as backend:
        assert backend.name == name and backend.selection == why
        assert backend.precision == ("bf16" if name == "openvino" else "fp32")
    monkeypatch.setenv("STRIP_CPU_BF16", "0")
    assert choose_backend(tiny_onnx, "cpu") == ("onnxruntime", "onnxruntime fp32 (auto: bf16 switched off by STRIP_CPU_BF16=0)")
    with pytest.raises(ValueError, match="precision bf16 asked for, but OpenVINO bf16 cannot run here"):
        choose_backend(tiny_onnx, "cpu", precision="bf16")
    monkeypatch.delenv("STRIP_CPU_BF16")
    assert choose_backend(tiny_onnx, "cpu", precision="fp32")[0] == "onnxruntime"
    assert choose_backend(tiny_onnx, "cpu", backend="openvino") == ("openvino", "openvino (asked for)")
    with pytest.raises(ValueError, match="the openvino backend runs .onnx/.xml files, not .pt"):
        choose_backend(tiny_pt, "cpu", backend="openvino")
    with pytest.raises(ValueError, match="backend must be one of auto, onnxruntime, openvino"):
        choose_backend(tiny_onnx, "cpu", backend="tflite")
    with pytest.raises(ValueError, match="int8 needs a quantised IR: engine build --target openvino"):
        load_backend(tiny_onnx, device="cpu", backend="openvino", precision="int8")
    from engine.devices import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="runs on the CPU here"):
        load_backend(tiny_onnx, device="cuda", backend="openvino")


def test_ir_build_round_trips_the_metadata(tiny_onnx: Path, tiny_frames: np.ndarray, tmp_path: Path, capsys) -> None:
    from engine.backends import load_backend
    from engine.metadata import read_onnx_metadata
    from toolchain.cli import main
    from toolchain.info import describe_model

    out = tmp_path / "model.xml"
    assert main(["build", "--target", "openvino", "--onnx", str(tiny_onnx), "--out", str(out),
                 "--precision", "fp32", "--parity-frames", "4"]) == 0
    assert "wrote" in capsys.readouterr().out and out.with_suffix(".bin").is_file()
    source = read_onnx_metadata(str(tiny_onnx)).to_dict()
    info = describe_model(out)
    assert info["format"] == "openvino" and info["metadata"] == source  # fp32: identical, precision included
    assert info["build"]["parity"]["passed"] and info["build"]["onnx_sha256"]
    assert [t["name"] for t in info["io"]] == ["frames", "masks", "counts", "present"]
    with load_backend(out) as ir, load_backend(tiny_onnx, device="cpu", backend="onnxruntime") as ort:
        assert (ir.name, ir.precision) == ("openvino", "fp32") and ir.metadata.to_dict() == source
        np.testing.assert_array_equal(ir.infer(tiny_frames).masks, ort.infer(tiny_frames).masks)
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(openvino)" in text and "parity      vs the fp32 graph" in text and "fp32 IR" in text


def test_int8_build_reports_parity_and_a_tight_tolerance_is_refused(tiny_onnx: Path, synth_dir: Path,
                                                                     tmp_path: Path, capsys) -> None:
    pytest.importorskip("nncf", reason="nncf is not installed (pip install 'strip-inspection[build]')")
    from engine.backends import load_backend
    from toolchain.build_openvino import BuildParityError, build_openvino
    from toolchain.cli import main

    out = tmp_path / "int8.xml"
    report = build_openvino(tiny_onnx, out, "int8", calibration=synth_dir, calibration_frames=24, parity_frames=12)
    assert report.parity.passed and report.parity.tolerance == tolerance_for("int8")
    assert report.calibration["calibration_frames"] == 24 and report.calibration["parity_frames"] == 12
    assert report.calibration["ignored_nodes"] > 0
    # Each of the two folds keeps its stem convolution and its segmentation head in fp32.
    assert report.calibration["fp32_layers"] == 4
    with load_backend(out) as backend:
        assert (backend.name, backend.precision, backend.metadata.precision) == ("openvino", "int8", "int8")
        assert backend.build["default_tolerance"] is True
        parity = backend.build["parity"]
        assert set(parity) >= {"mask_dice", "present_agreement", "max_count_diff", "max_prob_diff", "passed"}
        assert parity["mask_dice"] == pytest.approx(report.parity.mask_dice)
        assert parity["mask_dice"] > 0.5  # a quantised threshold would give empty masks (Dice 0)
        result = backend.infer(np.zeros((2, 64, 320), np.uint8))
        np.testing.assert_array_equal(result.masks.sum(axis=(2, 3)), result.counts)
    # NNCF quantised the U-Nets' weights: the IR is smaller than the fp32 one.
    assert out.with_suffix(".bin").stat().st_size < 0.5 * tiny_onnx.stat().st_size

    tight = tmp_path / "tight.xml"
    with pytest.raises(BuildParityError, match=r"tight.xml: not written: .*exceeds 1e-09"):
        build_openvino(tiny_onnx, tight, "int8", calibration=synth_dir, calibration_frames=24, parity_frames=12,
                       tolerance=tolerance_for("int8").with_overrides({"max_prob_diff": 1e-9}))
    assert not tight.exists() and not tight.with_suffix(".bin").exists()
    assert not list(tmp_path.glob("*.trial.*"))
    rc = main(["build", "--target", "openvino", "--onnx", str(tiny_onnx), "--out", str(tight), "--precision", "int8",
               "--calibration", str(synth_dir), "--calibration-frames", "24", "--parity-frames", "12",
               "--tolerance", "min_mask_dice=1.01"])
    err = capsys.readouterr().err
    assert rc == 2 and "engine build: error:" in err and "mask Dice" in err and "below 1.01" in err
    assert not tight.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--precision", "int8"], "--precision int8 needs --calibration DIR"),
        (["--out", "model.engine"], "an OpenVINO IR ends in .xml"),
        (["--tolerance", "no_such=1"], "unknown tolerance key(s) ['no_such']"),
        (["--tolerance", "max_prob_diff"], "expected KEY=NUMBER"),
    ],
)
def test_bad_build_requests_are_named(tiny_onnx: Path, tmp_path: Path, argv: list[str], message: str, capsys) -> None:
    from toolchain.cli import main

    base = ["build", "--target", "openvino", "--onnx", str(tiny_onnx), "--out", str(tmp_path / "m.xml")]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_tensorrt_precisions_stay_tensorrt_only(tiny_onnx: Path, tmp_path: Path, capsys) -> None:
    from toolchain.cli import main

    assert main(["build", "--onnx", str(tiny_onnx), "--out", str(tmp_path / "m.engine"), "--precision", "int8"]) == 2
    assert "--precision int8 is for --target openvino" in capsys.readouterr().err


def test_corrupt_ir_is_named(tmp_path: Path) -> None:
    from engine.backends import load_backend

    xml = tmp_path / "broken.xml"
    xml.write_text("<net><layers>")
    with pytest.raises(FileNotFoundError, match="broken.bin are missing"):
        load_backend(xml)
    xml.with_suffix(".bin").write_bytes(b"")
    with pytest.raises(ValueError, match="broken.xml: OpenVINO cannot load this model"):
        load_backend(xml)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="garbage.onnx: OpenVINO cannot load this model .not a readable ONNX model"):
        load_backend(garbage, backend="openvino")


def test_cpu_features_parse_the_flags() -> None:
    from engine.cpu import parse_cpuinfo

    text = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Test\nflags\t\t: fpu avx512f avx512_bf16 amx_int8 avx512_vnni\n"
    features = parse_cpuinfo(text)
    assert features.model == "Intel(R) Xeon(R) Test" and features.bf16 and features.int8 and features.amx
    assert "AMX-BF16 no" in features.line() and "AMX-INT8 yes" in features.line()
    bare = parse_cpuinfo("model name\t: Old\nflags\t\t: fpu sse2 avx2\n")
    assert not bare.bf16 and not bare.int8 and json.dumps(bare.to_dict())


def test_the_precision_switch_forces_either_way(monkeypatch) -> None:
    """STRIP_CPU_BF16: 0 and 1 override the CPU's answer, unset detects, anything else is refused."""
    import torch

    from engine.cpu import cpu_autocast_dtype, cpu_features, no_bf16_reason, supports_bf16

    monkeypatch.setenv("STRIP_CPU_BF16", "1")
    assert supports_bf16() and cpu_autocast_dtype() is torch.bfloat16 and cpu_autocast_dtype(amp=False) is None
    monkeypatch.setenv("STRIP_CPU_BF16", "0")
    assert not supports_bf16() and cpu_autocast_dtype() is None and "STRIP_CPU_BF16=0" in no_bf16_reason()
    monkeypatch.delenv("STRIP_CPU_BF16")
    assert supports_bf16() == cpu_features().bf16
    monkeypatch.setenv("STRIP_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="STRIP_CPU_BF16='yes': expected 0 .bf16 off., 1 .bf16 on. or unset"):
        supports_bf16()
