"""The int8 OpenVINO IR beside a model: when the automatic backend choice runs it (engine.backends.int8),
and a model int8 cannot keep, refused by its parity check; with real OpenVINO and NNCF.

Tolerance: INT8_TOLERANCE (toolchain.parity): mask Dice >= 0.9, labels agreeing on >= 95 % of
(image, class) pairs, <= 0.5 % of the pixels outside the 5e-2 band differing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.cpu import CpuFeatures

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'strip-inspection[cpu]')")


def _features(monkeypatch: pytest.MonkeyPatch, *flags: str) -> None:
    """This CPU reported as one with exactly ``flags`` (the automatic choices detect, no switch set)."""
    import engine.cpu

    monkeypatch.delenv("STRIP_CPU_INT8", raising=False)
    monkeypatch.setattr(engine.cpu, "cpu_features", lambda: CpuFeatures("Test CPU", frozenset(flags)))


def _copy_with_build(model: Path, dest: Path, **build: object) -> Path:
    """``model`` and its int8 IR copied into ``dest``, the IR's recorded build facts changed by ``build``."""
    from engine.backends.int8 import int8_ir_path
    from engine.backends.openvino_ir import BUILD_SECTION, read_model

    dest.mkdir()
    shutil.copyfile(model, dest / model.name)
    ir = read_model(int8_ir_path(model))
    for key, value in build.items():
        ir.set_rt_info(json.dumps(value), [BUILD_SECTION, key])
    ov.save_model(ir, str(int8_ir_path(dest / model.name)), compress_to_fp16=False)
    return dest / model.name


def test_a_model_deciding_on_one_grey_level_is_refused_int8(defect_onnx: Path, tmp_path: Path) -> None:
    """The defect model's classes are steps at single grey levels, carried through its layers by one
    channel: 8-bit activations round those levels (about 2.5 grey levels a step), so its int8 IR
    moves labels, and the build must refuse it, writing nothing."""
    pytest.importorskip("nncf", reason="nncf is not installed (pip install 'strip-inspection[build]')")
    from engine.metadata import read_onnx_metadata
    from toolchain.build_openvino import BuildParityError, build_openvino
    from toolchain.parity import synthetic_frames

    frames = synthetic_frames(48, *read_onnx_metadata(str(defect_onnx)).input_size, seed=5)
    out = tmp_path / "model.int8.xml"
    with pytest.raises(BuildParityError, match=r"not written: .*(mask Dice|labels agree)"):
        build_openvino(defect_onnx, out, "int8", calibration=frames, calibration_frames=32, parity_frames=16)
    assert not list(tmp_path.iterdir())


def test_auto_runs_the_int8_ir_only_on_a_cpu_with_int8(tiny_int8: Path, tiny_frames: np.ndarray,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.backends import load_backend, select_backend
    from engine.backends.int8 import int8_ir_path

    ir = int8_ir_path(tiny_int8)
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        _features(monkeypatch, flag)
        choice = select_backend(tiny_int8, "cpu")
        assert (choice.backend, choice.path) == ("openvino", ir), flag
        assert "auto: the CPU has native int8" in choice.reason and "mask Dice" in choice.reason
    with load_backend(tiny_int8, device="cpu") as backend:
        assert (backend.precision, backend.path, backend.selection) == ("int8", ir, choice.reason)
        with load_backend(ir) as direct:
            np.testing.assert_array_equal(backend.infer(tiny_frames).masks, direct.infer(tiny_frames).masks)
    _features(monkeypatch, "avx512_bf16", "avx2")
    choice = select_backend(tiny_int8, "cpu")
    assert choice.path == tiny_int8 and "model.int8.xml not used: this CPU has no native int8" in choice.reason
    monkeypatch.setenv("STRIP_CPU_INT8", "1")
    assert select_backend(tiny_int8, "cpu").path == ir
    assert "forced by STRIP_CPU_INT8=1" in select_backend(tiny_int8, "cpu").reason
    # Off, fp32 or bf16 asked for, or a GPU: the graph runs, never the IR.
    assert select_backend(tiny_int8, "cpu", int8="off").path == tiny_int8
    assert select_backend(tiny_int8, "cpu", precision="fp32").backend == "onnxruntime"
    assert select_backend(tiny_int8, "cpu", backend="openvino").path == tiny_int8
    assert select_backend(tiny_int8, "cuda").path == tiny_int8
    monkeypatch.setenv("STRIP_CPU_INT8", "0")
    assert "int8 switched off by STRIP_CPU_INT8=0" in select_backend(tiny_int8, "cpu").reason
    # Asked for explicitly, the IR runs on any CPU, saying it is slow there.
    _features(monkeypatch, "avx2")
    choice = select_backend(tiny_int8, "cpu", precision="int8")
    assert choice.path == ir and "slow on this CPU without VNNI or AMX-INT8" in choice.reason
    assert select_backend(tiny_int8, "cpu", int8=str(ir)).path == ir


def test_an_ir_without_passed_default_parity_or_of_another_graph_is_never_chosen(
        tiny_int8: Path, defect_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.backends import select_backend
    from engine.backends.int8 import int8_ir_path

    monkeypatch.setenv("STRIP_CPU_INT8", "1")
    parity = {**json.loads(json.dumps(_recorded_parity(tiny_int8))), "passed": False}
    failed = _copy_with_build(tiny_int8, tmp_path / "failed", parity=parity)
    loosened = _copy_with_build(tiny_int8, tmp_path / "loosened", default_tolerance=False)
    older = _copy_with_build(tiny_int8, tmp_path / "older")
    _drop_build_fact(int8_ir_path(older), "default_tolerance")
    stale = tmp_path / "stale" / "model.onnx"
    stale.parent.mkdir()
    shutil.copyfile(defect_onnx, stale)  # another graph, with the tiny model's IR beside it
    shutil.copyfile(int8_ir_path(tiny_int8), int8_ir_path(stale))
    shutil.copyfile(int8_ir_path(tiny_int8).with_suffix(".bin"), int8_ir_path(stale).with_suffix(".bin"))
    for model, why in ((failed, "no passed parity against the fp32 graph is recorded"),
                       (loosened, "passed its parity only under loosened limits"),
                       (stale, "was built from another graph than model.onnx"),
                       (older, "records no parity limits (built by an older engine build): rebuild it")):
        choice = select_backend(model, "cpu")
        assert choice.path == model and why in choice.reason, choice
        with pytest.raises(ValueError, match="precision int8 asked for"):
            select_backend(model, "cpu", precision="int8")
    # Pointed to, an IR that passed under loosened limits runs; a failed or stale one never does.
    assert select_backend(loosened, "cpu", int8=int8_ir_path(loosened)).path == int8_ir_path(loosened)
    for model in (failed, stale):
        with pytest.raises(ValueError, match=f"int8 IR {int8_ir_path(model)}: "):
            select_backend(model, "cpu", int8=int8_ir_path(model))
    with pytest.raises(ValueError, match="runs in place of an .onnx graph with OpenVINO on the CPU"):
        select_backend(tiny_int8, "cpu", precision="fp32", int8=int8_ir_path(tiny_int8))


def _drop_build_fact(ir: Path, key: str) -> None:
    """Rewrites the IR's XML without the build fact ``key`` (as an older ``engine build`` wrote it)."""
    text = ir.read_text(encoding="utf-8")
    kept = re.sub(rf"\s*<{key} value=\"[^\"]*\" />", "", text)
    assert kept != text, f"{key} not found in {ir}"
    ir.write_text(kept, encoding="utf-8")


def _recorded_parity(model: Path) -> dict:
    from engine.backends.int8 import int8_ir_path
    from engine.backends.openvino_ir import build_info, read_model

    return build_info(read_model(int8_ir_path(model)))["parity"]


def test_without_an_ir_int8_asked_for_says_how_to_build_one(tiny_onnx: Path, monkeypatch) -> None:
    from engine.backends import select_backend

    monkeypatch.setenv("STRIP_CPU_INT8", "1")
    assert "int8" not in select_backend(tiny_onnx, "cpu").reason  # nothing to say where no IR sits
    with pytest.raises(ValueError, match=r"no int8 IR model.int8.xml beside model.onnx: .*engine build --target "
                                         r"openvino --precision int8 --onnx .*model.onnx --calibration DIR --out "
                                         r".*model.int8.xml"):
        select_backend(tiny_onnx, "cpu", precision="int8")
