"""``trainer export``: the ONNX inspection graph, its metadata and its self-check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.cli_util import run_cli
from engine.metadata import read_onnx_metadata
from tests.fixtures import make_tiny_run
from toolchain.parity import FP32_TOLERANCE, Tolerance, compare_outputs, synthetic_frames


def _export_cli(argv: list[str]) -> int:
    return run_cli("trainer", "test", {"export": "trainer.commands.export"}, ["export", *argv])


def test_graph_signature(tiny_onnx: Path) -> None:
    import onnx

    model = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(model)
    elem = onnx.TensorProto
    signature = {
        v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
        for v in [*model.graph.input, *model.graph.output]
    }
    assert signature["frames"] == (elem.UINT8, ["N", 64, 320])
    assert signature["masks"] == (elem.UINT8, ["N", 4, 64, 320])
    assert signature["counts"] == (elem.INT32, ["N", 4])
    assert signature["present"] == (elem.BOOL, ["N", 4])
    assert "probs" not in signature  # only with --with-probs


def test_metadata_round_trips(tiny_onnx: Path, tiny_run: Path) -> None:
    from engine.hashing import file_sha256

    meta = read_onnx_metadata(str(tiny_onnx))
    postprocess = json.loads((tiny_run / "postprocess.json").read_text())
    assert meta.thresholds == postprocess["thresholds"]
    assert meta.min_areas == postprocess["min_areas"]
    assert meta.folds == 2
    assert meta.checkpoint_sha256 == [file_sha256(tiny_run / f"fold{k}" / "best.pt") for k in (0, 1)]
    assert (meta.input_height, meta.input_width, meta.train_height, meta.train_width) == (64, 320, 32, 160)
    assert (meta.mean, meta.std, meta.encoder, meta.precision) == (0.5, 0.25, "resnet18", "fp32")
    assert meta.model_version.startswith("run-")


def test_onnx_runtime_matches_torch_reference(tiny_onnx: Path, tiny_run: Path, tiny_frames: np.ndarray) -> None:
    """ORT CPU vs the torch eager graph on frames the export never saw; fp32 tolerance (see toolchain.parity)."""
    import torch

    from engine.backends import load_backend
    from network.inspection import InspectionModel
    from trainer.rundir import load_run

    run = load_run(tiny_run)
    with torch.no_grad():
        masks, counts, present, probs = InspectionModel(run.folds, run.metadata, with_probs=True)(
            torch.from_numpy(tiny_frames)
        )
    reference = {"masks": masks.numpy(), "counts": counts.numpy(), "present": present.numpy(), "probs": probs.numpy()}
    with load_backend(tiny_onnx, device="cpu", backend="onnxruntime", threads=1) as backend:
        result = backend.infer(tiny_frames)
    report = compare_outputs(reference, result, run.metadata.thresholds, run.metadata.min_areas, FP32_TOLERANCE)
    assert report.passed, report.summary()
    # Counts away from the threshold band are exact, so at most the near-threshold pixels differ.
    assert report.max_count_diff <= int(report.near_threshold_fraction * masks.numel())
    # The fixture's thresholds make every kind of outcome occur (see tests.fixtures.tiny_postprocess).
    assert 0 < result.present[:, 0].sum() < len(tiny_frames)
    assert result.present[:, 1].all()
    assert result.counts[:, 2].sum() > 0 and not result.present[:, 2].any()
    assert result.counts[:, 3].sum() == 0


def test_fp16_export_reports_parity_against_fp32(tiny_run: Path, tmp_path: Path) -> None:
    import onnx

    from trainer.export import export_onnx

    report = export_onnx(tiny_run, tmp_path / "fp16.onnx", precision="fp16", with_probs=True)
    (parity,) = report.parity
    assert parity.passed, parity.summary()
    assert parity.reference == "torch eager fp32" and parity.candidate == "onnxruntime cpu fp16"
    # Real half precision: the probabilities are no longer bit-close to fp32.
    assert 0 < parity.max_prob_diff <= 5e-2 and 0 < parity.mean_prob_diff <= 1e-3
    model = onnx.load(str(tmp_path / "fp16.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert types == {
        "frames": onnx.TensorProto.UINT8,
        "masks": onnx.TensorProto.UINT8,
        "counts": onnx.TensorProto.INT32,
        "present": onnx.TensorProto.BOOL,
        "probs": onnx.TensorProto.FLOAT,
    }
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    weight_types = {t.data_type for t in model.graph.initializer if t.name in conv_weights}
    assert weight_types == {onnx.TensorProto.FLOAT16}
    assert read_onnx_metadata(str(tmp_path / "fp16.onnx")).precision == "fp16"


def test_efficientnet_exports(tmp_path: Path) -> None:
    from trainer.export import export_onnx

    unet = {"encoder": "efficientnet-b0", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}
    run_dir = make_tiny_run(tmp_path / "run", folds=1, unet=unet, input_size=(32, 64), train_size=(32, 64))
    report = export_onnx(run_dir, tmp_path / "effnet.onnx")
    assert report.parity[0].passed, report.parity[0].summary()
    assert report.metadata.encoder == "efficientnet-b0" and report.metadata.thresholds == [0.5] * 4


def test_fold_selection_and_defaults(tmp_path: Path) -> None:
    from engine.hashing import file_sha256
    from trainer.export import export_onnx

    run_dir = make_tiny_run(tmp_path / "run", folds=3)
    report = export_onnx(run_dir, tmp_path / "f1.onnx", folds="2,0")
    meta = read_onnx_metadata(str(tmp_path / "f1.onnx"))
    assert report.fold_ids == [2, 0] and meta.folds == 2
    assert meta.checkpoint_sha256 == [file_sha256(run_dir / f"fold{k}" / "best.pt") for k in (2, 0)]
    # No postprocess.json: the thesis decision rule.
    assert meta.thresholds == [0.5] * 4 and meta.min_areas == [200] * 4


def test_run_errors_name_the_problem(tmp_path: Path) -> None:
    from trainer.export import export_onnx
    from trainer.rundir import load_run

    with pytest.raises(FileNotFoundError, match="no such run directory"):
        load_run(tmp_path / "nowhere")
    run_dir = make_tiny_run(tmp_path / "run", folds=1)
    with pytest.raises(FileNotFoundError, match=r"fold\(s\) \[3\].*found folds \[0\]"):
        load_run(run_dir, folds="0,3")
    with pytest.raises(ValueError, match="--folds must be 'all' or comma-separated"):
        load_run(run_dir, folds="first")
    (run_dir / "postprocess.json").write_text(json.dumps({"thresholds": [0.5, 0.5], "min_areas": [1, 2, 3, 4]}))
    with pytest.raises(ValueError, match=r"postprocess.json: 'thresholds' must be a list of 4 values"):
        load_run(run_dir)
    (run_dir / "postprocess.json").write_text("{not json")
    with pytest.raises(ValueError, match="postprocess.json: not valid JSON"):
        load_run(run_dir)
    (run_dir / "postprocess.json").unlink()
    other = make_tiny_run(tmp_path / "other", folds=2, train_size=(64, 320))
    (other / "fold1").rename(run_dir / "fold1")  # a fold trained at another resolution
    with pytest.raises(ValueError, match="fold1/best.pt: train_size .* differs from fold 0"):
        load_run(run_dir)
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(run_dir, tmp_path / "model.bin", folds="0")


def test_cli_writes_onnx_and_bundle(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _export_cli(["--run", str(tiny_run), "--out", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "PASS" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["parity"][0]["passed"] and report["metadata"]["folds"] == 2
    assert _export_cli(["--run", str(tiny_run), "--out", str(tmp_path / "m.pt")]) == 0
    assert (tmp_path / "m.pt").is_file()
    assert _export_cli(["--run", str(tiny_run), "--out", str(tmp_path / "m.txt")]) == 2
    assert "expected a .onnx (inspection graph) or .pt" in capsys.readouterr().err
    assert _export_cli(["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no such run directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- the parity measure itself


def _outputs(probs: np.ndarray, thresholds: list[float], min_areas: list[int]) -> dict[str, np.ndarray]:
    masks = (probs >= np.asarray(thresholds, np.float32).reshape(1, -1, 1, 1)).astype(np.uint8)
    counts = masks.sum(axis=(2, 3)).astype(np.int32)
    return {"probs": probs, "masks": masks, "counts": counts, "present": counts >= np.asarray(min_areas)}


def test_parity_flags_each_kind_of_disagreement() -> None:
    rng = np.random.default_rng(0)
    thresholds, min_areas = [0.5, 0.6], [10, 10]
    probs = rng.uniform(0, 1, size=(2, 2, 16, 16)).astype(np.float32)
    probs[0, 0, 0, 0] = 0.5004  # near the threshold
    probs[0, 0, 0, 1] = 0.9  # far from it
    reference = _outputs(probs, thresholds, min_areas)
    tol = Tolerance(max_prob_diff=1e-3, max_mask_mismatch=0.0)

    assert compare_outputs(reference, _outputs(probs.copy(), thresholds, min_areas), thresholds, min_areas, tol).passed

    near = probs.copy()
    near[0, 0, 0, 0] = 0.4996  # flips, but within the band: allowed
    report = compare_outputs(reference, _outputs(near, thresholds, min_areas), thresholds, min_areas, tol)
    assert report.passed and report.max_count_diff == 1

    far = _outputs(probs.copy(), thresholds, min_areas)
    far["masks"][0, 0, 0, 1] = 0
    far["counts"] = far["masks"].sum(axis=(2, 3)).astype(np.int32)
    report = compare_outputs(reference, far, thresholds, min_areas, tol)
    assert not report.passed and "mask pixels away from the threshold differ" in report.summary()

    drifted = probs + 2e-3
    report = compare_outputs(reference, _outputs(drifted, thresholds, min_areas), thresholds, min_areas, tol)
    assert any("max |dprob|" in f for f in report.failures)
    assert compare_outputs(
        reference, _outputs(drifted, thresholds, min_areas), thresholds, min_areas,
        Tolerance(max_prob_diff=1.0, max_mask_mismatch=1.0, max_mean_prob_diff=1e-3),
    ).failures == ["mean |dprob| 0.002 exceeds 0.001"]

    overflowed = probs.copy()
    overflowed[1, 1, 3, 3] = np.nan
    report = compare_outputs(reference, _outputs(overflowed, thresholds, min_areas), thresholds, min_areas, tol)
    assert any("include NaN or infinity" in f for f in report.failures)

    miscounted = _outputs(probs.copy(), thresholds, min_areas)
    miscounted["counts"][1, 1] += 1
    report = compare_outputs(reference, miscounted, thresholds, min_areas, tol)
    assert any("counts disagree with its own masks (image 1, class 2" in f for f in report.failures)

    mislabelled = _outputs(probs.copy(), thresholds, min_areas)
    mislabelled["present"][0, 0] = ~mislabelled["present"][0, 0]
    report = compare_outputs(reference, mislabelled, thresholds, min_areas, tol)
    assert any("present disagrees with counts >= min_area" in f for f in report.failures)


def test_synthetic_frames_are_deterministic_and_varied() -> None:
    a = synthetic_frames(3, 32, 64, seed=5)
    assert a.dtype == np.uint8 and a.shape == (3, 32, 64)
    assert np.array_equal(a, synthetic_frames(3, 32, 64, seed=5))
    assert not np.array_equal(a, synthetic_frames(3, 32, 64, seed=6))
    assert a.std() > 10 and not np.array_equal(a[0], a[1])
