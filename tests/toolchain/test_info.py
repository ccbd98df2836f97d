"""``engine info``: metadata and tensors of .onnx, .engine and .pt files; clear errors for bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli_util import run_cli
from engine.metadata import read_onnx_metadata
from tests.fixtures import write_engine_with_sidecar
from toolchain.info import describe_model, format_info


def _info(argv: list[str]) -> int:
    return run_cli("engine", "test", {"info": "toolchain.info"}, ["info", *argv])


def test_onnx_info(tiny_onnx: Path, capsys: pytest.CaptureFixture) -> None:
    info = describe_model(tiny_onnx)
    assert info["format"] == "onnx" and info["opset"] == 17
    assert info["metadata"] == read_onnx_metadata(str(tiny_onnx)).to_dict()
    io = {t["name"]: (t["mode"], t["dtype"], t["shape"]) for t in info["io"]}
    assert io == {
        "frames": ("input", "uint8", ["N", 64, 320]),
        "masks": ("output", "uint8", ["N", 4, 64, 320]),
        "counts": ("output", "int32", ["N", 4]),
        "present": ("output", "bool", ["N", 4]),
    }
    assert _info([str(tiny_onnx)]) == 0
    text = capsys.readouterr().out
    meta = info["metadata"]
    assert "opset 17" in text and "2 x resnet18 U-Net, fp32" in text
    assert f"{meta['thresholds'][0]:g}" in text and str(meta["min_areas"][0]) in text
    assert "input   frames   uint8    [N, 64, 320]" in text
    assert _info([str(tiny_onnx), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == info["sha256"]


def test_torch_info(tiny_pt: Path, tiny_run: Path) -> None:
    bundle = describe_model(tiny_pt)
    assert bundle["format"] == "torch ensemble bundle" and bundle["metadata"]["folds"] == 2
    fold = describe_model(tiny_run / "fold0" / "best.pt")
    assert fold["format"].startswith("torch fold 0 checkpoint") and fold["metadata"]["thresholds"] == [0.5] * 4
    assert "frames" in format_info(fold)


def test_engine_info_from_sidecar(tmp_path: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture) -> None:
    engine = write_engine_with_sidecar(tmp_path / "model.engine", tiny_onnx)
    info = describe_model(engine)
    assert info["format"] == "tensorrt" and info["tensorrt_version"] == "10.8.0.43"
    assert info["metadata"] == read_onnx_metadata(str(tiny_onnx)).to_dict() | {"precision": "fp16"}
    assert _info([str(engine)]) == 0
    text = capsys.readouterr().out
    assert "10.8.0.43 on NVIDIA A10 (compute capability 8.6)" in text and "batch profile 1/8/32" in text
    assert "output  masks    uint8    [-1, 4, 64, 320]" in text


def test_corrupt_and_truncated_onnx(tmp_path: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny_onnx.read_bytes()[: tiny_onnx.stat().st_size // 3])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(bytes(range(256)) * 40)
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match=rf"{bad.name}: not a (readable|valid) ONNX model"):
            describe_model(bad)
        assert _info([str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("engine info: error: ") and bad.name in err and "Traceback" not in err


def test_corrupt_and_truncated_engine(tmp_path: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture) -> None:
    engine = write_engine_with_sidecar(tmp_path / "model.engine", tiny_onnx)
    data = engine.read_bytes()
    engine.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.engine: \d+ bytes, but its sidecar records \d+: the engine is truncated"):
        describe_model(engine)
    engine.write_bytes(bytes(b ^ 0xFF for b in data))  # same size, other bytes
    with pytest.raises(ValueError, match="differs from its sidecar's .* corrupt or was replaced; rebuild it with: engine build"):
        describe_model(engine)
    engine.write_bytes(data)
    (tmp_path / "model.engine.json").write_text('{"format": "strip-inspection/engine-sidecar/1", "tensorrt_')
    with pytest.raises(ValueError, match="model.engine.json: corrupt engine sidecar"):
        describe_model(engine)
    (tmp_path / "model.engine.json").unlink()
    assert _info([str(engine)]) == 2
    assert "no sidecar next to the engine" in capsys.readouterr().err


def test_unknown_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such model file"):
        describe_model(tmp_path / "absent.onnx")
    (tmp_path / "model.tflite").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown model file type '.tflite'"):
        describe_model(tmp_path / "model.tflite")


def test_engine_info_on_onnx_does_not_import_torch(tiny_onnx: Path) -> None:
    code = (
        "import json, sys\n"
        "from toolchain.cli import main\n"
        f"rc = main(['info', {str(tiny_onnx)!r}, '--json'])\n"
        "heavy = sorted(m for m in ('torch', 'segmentation_models_pytorch', 'matplotlib') if m in sys.modules)\n"
        "print('MODULES', json.dumps(heavy))\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert '"sha256"' in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith("MODULES"))
    assert json.loads(line.split(" ", 1)[1]) == []
