"""``trainer fit --data A --data B``: the line's original data plus a folder of reviewed captures from the
server's capture writer, trained together with folds stratified over the union."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import rle
from server.capture import CapturePolicy, CaptureWriter
from trainer.config import FitOptions, FitSettings, resolve
from trainer.data import DataConfig, load_samples, read_image
from trainer.fit import run_fit
from trainer.samples import label_matrix
from trainer.splits import HOLDOUT, read_folds
from trainer.synth import draw_frame, synthesize

SIZE = (64, 320)
CAPTURES = 30
# Stratification tolerance: each fold's (and the holdout's) count of each class lies within 1.5 images of its
# exact share of the union. Shares are fractional and part sizes fixed; the splitter's worst deviation over
# 20,000 random label matrices was 1.17 images (tests/trainer/test_splits.py).
SHARE_TOLERANCE = 1.5


def write_captures(folder: Path, count: int, seed: int) -> list[np.ndarray]:
    """``count`` line frames saved by the server's capture writer, labelled as a reviewer confirmed them.

    Frames of ``trainer.synth`` with one defect class each in turn (every fifth defect-free); the true
    masks stand in for the reviewed predictions, so ``train.csv`` holds exactly the drawn defects.
    """
    frames = []
    with CaptureWriter(folder, CapturePolicy.parse("sample:1.0"), min_areas=[1] * 4, quota_bytes=10**9) as writer:
        for i in range(count):
            classes = () if i % 5 == 4 else (i % 5,)
            frame, masks = draw_frame(np.random.default_rng([seed, i]), *SIZE, classes, 4)
            counts = masks.reshape(4, -1).sum(axis=1)
            assert writer.offer(frame, camera_id="line-b", frame_id=i, time_ns=1_700_000_000_000_000_000 + i,
                                model_version="reviewed", rles=rle.encode_batch(masks[None])[0], counts=counts,
                                present=counts > 0)
            frames.append(frame)
    assert writer.written == count
    return frames


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The line's original data (48 ``trainer synth`` frames, seed 3) and a capture folder (seed 4)."""
    root = tmp_path_factory.mktemp("multi_data")
    original = synthesize(root / "original", 48, *SIZE, seed=3)
    captures = root / "captures"
    write_captures(captures, CAPTURES, seed=4)
    return original, captures


def test_fit_on_original_data_and_captures_splits_and_trains_on_the_union(
    two_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    original, captures = two_folders
    cfg = resolve(FitSettings(data=[str(original), str(captures)], encoder="resnet18", encoder_weights="none",
                            encoder_depth=3, decoder_channels=(16, 8, 4), scale=0.5, folds=2, holdout=0.15,
                            epochs=1, batch_size=8))
    run = tmp_path / "run"
    outcomes = run_fit(cfg, FitOptions(out=str(run), fold=0, device="cpu", workers=0, progress=False))
    assert [o.fold for o in outcomes] == [0] and outcomes[0].epochs_run == cfg.optim.epochs
    assert json.loads((run / "config.json").read_text())["data"] == [str(original), str(captures)]

    # The capture folder loads through the trainer's reader: its frames and labels are what was captured.
    data_cfg = DataConfig(num_classes=4, height=SIZE[0], width=SIZE[1])
    samples = load_samples([original, captures], data_cfg)
    from_captures = [s for s in samples if s.source == captures]
    assert len(from_captures) == CAPTURES and all(s.image_id.endswith(".png") for s in from_captures)
    assert len(samples) == 48 + CAPTURES
    frame, _ = draw_frame(np.random.default_rng([4, 0]), *SIZE, (0,), 4)
    first = next(s for s in from_captures if s.image_id.startswith("line-b_000000000000_"))
    np.testing.assert_array_equal(read_image(first.path, data_cfg), frame)  # saved losslessly

    # folds.csv covers the union: every image of both folders once, with its labels.
    assignment = read_folds(run / "folds.csv")
    assert sorted(assignment) == [s.image_id for s in samples]
    ids = [s.image_id for s in samples]
    fold = np.array([assignment[i] for i in ids])
    source = np.array([s.source == captures for s in samples])
    for part in (HOLDOUT, 0, 1):  # the folders are shared out, not kept apart
        assert source[fold == part].any() and (~source[fold == part]).any(), part

    # ... stratified over the union: each part holds its share of every class.
    labels = label_matrix(samples, 4)
    assert labels[source].sum(axis=0).min() >= 4 and labels[~source].sum(axis=0).min() >= 2
    holdout = fold == HOLDOUT
    assert holdout.sum() == round(0.15 * len(samples))
    rest = labels[~holdout].sum(axis=0)
    sizes = np.bincount(fold[~holdout], minlength=2)
    for k in (0, 1):
        share = rest * sizes[k] / sizes.sum()
        assert np.all(np.abs(labels[fold == k].sum(axis=0) - share) <= SHARE_TOLERANCE), (k, labels[fold == k].sum(0), share)
    share = labels.sum(axis=0) * holdout.sum() / len(samples)
    assert np.all(np.abs(labels[holdout].sum(axis=0) - share) <= SHARE_TOLERANCE)

    # Fold 0 trained on the union's other fold and validated on its own.
    facts = json.loads((run / "fold0" / "config.json").read_text())["data"]
    assert facts["train_images"] == sizes[1] and facts["val_images"] == sizes[0]
    assert facts["class_counts_before_balancing"] == labels[fold == 1].sum(axis=0).tolist()
    assert (run / "fold0" / "best.pt").is_file()

    # Its export's drift reference samples the training frames of both folders (fold 0's, predicted by fold 0).
    from trainer.export import export_onnx

    report = export_onnx(run, tmp_path / "model.onnx", drift_frames=20, parity_frames=0)
    drawn = report.drift.image_ids
    assert report.metadata.drift_reference is not None and len(drawn) == 20
    assert all(assignment[i] == 0 for i in drawn)
    assert {s.source for s in samples if s.image_id in drawn} == {original, captures}


def test_the_same_image_in_two_folders_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from trainer.cli import main

    first = synthesize(tmp_path / "a", 12, *SIZE, seed=7)
    again = synthesize(tmp_path / "b", 12, *SIZE, seed=8)
    duplicate = sorted(p.name for p in (first / "train_images").iterdir())[5]
    shutil.copy(first / "train_images" / duplicate, again / "train_images")  # one frame in both folders
    code = main(["fit", "--data", str(first), "--data", str(again), "--out", str(tmp_path / "run"), "--encoder",
                 "resnet18", "--encoder-weights", "none", "--encoder-depth", "3", "--decoder-channels", "16,8,4",
                 "--folds", "2", "--epochs", "1", "--device", "cpu", "--workers", "0", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"image {duplicate} is in two data folders: {first} and {again}" in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob("fold*"))  # refused before any training
