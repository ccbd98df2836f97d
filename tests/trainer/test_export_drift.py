"""``trainer export``'s drift reference: training frames of the run, areas from out-of-fold predictions,
round trip through the ONNX metadata, ``--drift-frames 0``, and a run copied away from its data."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cli_util import run_cli
from engine.drift import FRAME_STAT_NAMES, DriftReference, StatReference, build_reference
from engine.metadata import read_onnx_metadata
from network.checkpoint import load_fold
from network.inspection import InspectionModel
from toolchain.info import describe_model, format_info
from trainer.data import DataConfig, load_samples, read_image
from trainer.export import export_ensemble, export_onnx
from trainer.splits import HOLDOUT, read_folds

FRAMES = 64  # sampled of the 532 training images: enough for every bin, quick to predict
PIXELS = 64 * 320


def _export_cli(argv: list[str]) -> int:
    return run_cli("trainer", "test", {"export": "trainer.commands.export"}, ["export", *argv])


def _info_cli(argv: list[str]) -> int:
    return run_cli("engine", "test", {"info": "toolchain.info"}, ["info", *argv])


def _reference(path: Path) -> DriftReference | None:
    stored = read_onnx_metadata(str(path)).drift_reference
    return None if stored is None else DriftReference.from_dict(stored)


def _data(run: Path) -> list[Path]:
    return [Path(d) for d in json.loads((run / "config.json").read_text())["data"]]


@pytest.fixture(scope="module")
def exported(tiny_data_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """``tiny_data_run`` (2 random folds) exported with a reference of 64 frames: (model path, report)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("drift_export") / "model.onnx"
    return out, export_onnx(tiny_data_run, out, drift_frames=FRAMES)


def _assert_close(a: StatReference, b: StatReference, value_tol: float, share_tol: float) -> None:
    assert a.name == b.name
    np.testing.assert_allclose(a.edges, b.edges, rtol=0, atol=value_tol, err_msg=a.name)
    np.testing.assert_allclose(a.proportions, b.proportions, rtol=0, atol=share_tol, err_msg=a.name)
    assert (a.quantiles is None) == (b.quantiles is None), a.name
    if a.quantiles is not None:
        np.testing.assert_allclose(a.quantiles, b.quantiles, rtol=0, atol=value_tol, err_msg=a.name)


def test_reference_is_training_frames_with_out_of_fold_areas(exported, tiny_data_run: Path) -> None:
    path, report = exported
    reference = _reference(path)
    assert reference is not None
    # Round trip: what the ONNX carries is what the export built and reported.
    assert read_onnx_metadata(str(path)).drift_reference == report.metadata.drift_reference
    assert reference.frames == reference.count_frames == report.drift.frames == FRAMES
    assert reference.names == (*FRAME_STAT_NAMES, "area_class_1", "area_class_2", "area_class_3", "area_class_4")

    # The sample: distinct non-holdout images of the run, from both folds, each predicted by its own fold.
    assignment = read_folds(tiny_data_run / "folds.csv")
    ids = report.drift.image_ids
    assert len(set(ids)) == FRAMES and all(assignment[i] != HOLDOUT for i in ids)
    assert report.drift.frames_per_fold == {k: sum(assignment[i] == k for i in ids) for k in (0, 1)}
    assert min(report.drift.frames_per_fold.values()) > 0 and report.drift.seconds > 0
    assert report.drift.data == [str(d) for d in _data(tiny_data_run)]
    assert f"drift reference: {FRAMES} training frames, areas out of fold" in report.summary()

    # Independently: each frame alone through InspectionModel([the fold that did not train on it]).
    meta = report.metadata
    cfg = DataConfig(num_classes=4, height=64, width=320)
    by_id = {s.image_id: s for s in load_samples(_data(tiny_data_run), cfg)}
    frames = np.stack([read_image(by_id[i].path, cfg) for i in ids])
    models = {k: InspectionModel([load_fold(tiny_data_run / f"fold{k}" / "best.pt")[0]], meta).eval() for k in (0, 1)}

    def counts_by(fold_of) -> np.ndarray:
        with torch.no_grad():
            return np.stack([models[fold_of(i)](torch.from_numpy(f[None]))[1][0].numpy() for i, f in zip(ids, frames)])

    expected = build_reference([frames], counts_by(lambda i: assignment[i]))
    # The frame statistics are of the very same pixels: equal exactly.
    assert reference.stats[:4] == expected.stats[:4]
    # Areas: a pixel whose probability sits at its threshold may flip between batch compositions (CPU
    # convolution kernels depend on the batch size), so a frame's count may differ by a pixel or two:
    # edges/quantiles within 2 pixels' share of the frame, bin shares within 2 frames' share.
    assert (counts_by(lambda i: assignment[i]) > 0).any(axis=0)[:3].all()  # the areas are not all zero
    for got, want in zip(reference.stats[4:], expected.stats[4:]):
        _assert_close(got, want, value_tol=2 / PIXELS, share_tol=2 / FRAMES)
    # ...a tolerance the in-fold predictions (each frame by the fold that trained on it) are far outside.
    in_fold = build_reference([frames], counts_by(lambda i: 1 - assignment[i]))
    with pytest.raises(AssertionError):
        for got, wrong in zip(reference.stats[4:], in_fold.stats[4:]):
            _assert_close(got, wrong, value_tol=2 / PIXELS, share_tol=2 / FRAMES)


def test_drift_frames_zero_writes_none_and_engine_info_tells(
    exported, tiny_data_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path, _ = exported
    assert _info_cli([str(path)]) == 0
    assert f"drift       reference of {FRAMES} training frames ({FRAMES} with out-of-fold areas)" in capsys.readouterr().out

    bare = tmp_path / "bare.onnx"
    assert _export_cli(["--run", str(tiny_data_run), "--out", str(bare), "--drift-frames", "0",
                        "--parity-frames", "0", "--report", str(tmp_path / "report.json")]) == 0
    assert "drift reference: none (--drift-frames 0)" in capsys.readouterr().out
    assert read_onnx_metadata(str(bare)).drift_reference is None
    assert json.loads((tmp_path / "report.json").read_text())["drift"]["frames"] == 0
    assert _info_cli([str(bare)]) == 0
    assert "drift       no reference: a server will not monitor drift" in capsys.readouterr().out

    # Too few frames for the histogram bins is a clear error, not a coarse reference.
    assert _export_cli(["--run", str(tiny_data_run), "--out", str(bare), "--drift-frames", "3"]) == 2
    err = capsys.readouterr().err
    assert "--drift-frames must be 0 (no drift reference) or at least 10" in err and "Traceback" not in err


def test_ensemble_bundle_carries_the_same_reference(exported, tiny_data_run: Path, tmp_path: Path) -> None:
    path, report = exported
    bundle = tmp_path / "model.pt"
    bundle_report = export_ensemble(tiny_data_run, bundle, drift_frames=FRAMES)
    # The same seeded sample; areas predicted alike (the same fold models and batches).
    assert bundle_report.drift.image_ids == report.drift.image_ids
    assert describe_model(bundle)["metadata"]["drift_reference"] == read_onnx_metadata(str(path)).drift_reference
    assert f"reference of {FRAMES} training frames" in format_info(describe_model(bundle))


def test_run_copied_away_from_its_data_exports_without_reference_or_with_data(
    exported, tiny_data_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    _, report = exported
    moved = tmp_path / "copied-run"
    shutil.copytree(tiny_data_run, moved)
    config = json.loads((moved / "config.json").read_text())
    gone = tmp_path / "elsewhere" / "data"  # where the data was on the training machine
    (moved / "config.json").write_text(json.dumps({**config, "data": [str(gone)]}))

    with caplog.at_level(logging.WARNING, logger="trainer.export"):
        plain = export_onnx(moved, tmp_path / "plain.onnx", drift_frames=FRAMES, parity_frames=0)
    assert read_onnx_metadata(str(tmp_path / "plain.onnx")).drift_reference is None
    assert plain.drift.frames == 0 and str(gone) in plain.drift.skipped
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(gone) in warning and "without a drift reference" in warning and "--data DIR" in warning

    # --data points at the data: the same sample and reference as the run where it was trained.
    data = _data(tiny_data_run)[0]
    assert _export_cli(["--run", str(moved), "--out", str(tmp_path / "found.onnx"), "--data", str(data),
                        "--drift-frames", str(FRAMES), "--parity-frames", "0"]) == 0
    assert f"drift reference: {FRAMES} training frames" in capsys.readouterr().out
    assert _reference(tmp_path / "found.onnx") == DriftReference.from_dict(report.metadata.drift_reference)

    # Named explicitly, missing data or split is an error naming it, not a warning.
    assert _export_cli(["--run", str(moved), "--out", str(tmp_path / "x.onnx"), "--data", str(gone)]) == 2
    err = capsys.readouterr().err
    assert f"--data {gone}: no such data folder" in err and "Traceback" not in err
    (moved / "folds.csv").unlink()
    assert _export_cli(["--run", str(moved), "--out", str(tmp_path / "x.onnx"), "--data", str(data)]) == 2
    assert f"{moved / 'folds.csv'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_run_without_recorded_data_exports_without_reference(tiny_onnx: Path) -> None:
    # tiny_run's config.json names no data folder (random U-Nets, no training data): a model all the same.
    assert read_onnx_metadata(str(tiny_onnx)).drift_reference is None
    assert "no reference" in format_info(describe_model(tiny_onnx))
