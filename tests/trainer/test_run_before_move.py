"""A run made before the trainer's restructuring (issue 22) still evaluates and exports after it.

``fixtures/run_before_move/`` was written by ``trainer synth``/``fit``/``evaluate --split oof`` on
the code before the move (16 synthetic 64x320 frames; resnet18 at encoder depth 1, decoder 4,
scale 0.5, 2 folds, 1 epoch, CPU with --amp: bf16 on that CPU) and committed as it was, minus ``last.pt``. Its
``config.json`` still names the data folder it was trained on (gone), so the commands get
``--data`` as a user moving a run would. The figures below were recorded then; losses and
probabilities are compared to 1e-4 relative / 1e-6 absolute, room for a different CPU's float
summation order, far below what a changed weight, normalisation or decision rule moves them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "run_before_move"
DATA = FIXTURE / "data"

#: Recorded with the code before the move (commit 79d4d09), fp32 as the suite runs (tests/conftest.py).
HOLDOUT_LOSS = 0.006697664503008127
OOF_LOSS = 0.019275866448879242
OOF_THESIS_DICE = 0.00033921302578018993
FRAMES = ["044c7080b.jpg", "1cfc379c2.jpg", "25dd60bcc.jpg", "3b78eb3ba.jpg"]
MEAN_PROBS = [
    [0.0005649899248965085, 0.0009154662257060409, 0.0014129994669929147, 0.008652450516819954],
    [0.0004955112235620618, 0.0009456273401156068, 0.00135199842043221, 0.009004952386021614],
    [0.0005294452421367168, 0.0009296590578742325, 0.0013823825865983963, 0.008821447379887104],
    [0.0005134232342243195, 0.0009367720922455192, 0.0013680483680218458, 0.008906015194952488],
]


@pytest.fixture
def old_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the committed run (evaluate writes into the run directory), evaluated in fp32 as its
    figures were recorded (it trained with --amp, so a bf16 CPU would otherwise evaluate it in bf16)."""
    monkeypatch.setenv("STRIP_CPU_BF16", "0")
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    return run


def _evaluate(run: Path, split: str, out: Path) -> dict:
    argv = ["evaluate", "--run", str(run), "--data", str(DATA), "--split", split, "--device", "cpu",
            "--workers", "0", "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_old_run_evaluates_to_the_recorded_figures(old_run: Path, tmp_path: Path) -> None:
    holdout = _evaluate(old_run, "holdout", tmp_path / "holdout.json")
    assert holdout["images"] == 4
    assert holdout["loss"] == pytest.approx(HOLDOUT_LOSS, rel=1e-4)
    # The run's searched post-processing (its postprocess.json) is the model's rule.
    assert holdout["rules"]["model"]["thresholds"] == [0.1] * 4 and holdout["rules"]["model"]["min_areas"] == [1] * 4
    assert holdout["rules"]["model"]["scores"]["kaggle"] == pytest.approx(0.9375)

    oof = _evaluate(old_run, "oof", tmp_path / "oof.json")
    assert oof["images"] == 12 and oof["loss"] == pytest.approx(OOF_LOSS, rel=1e-4)
    assert oof["rules"]["thesis"]["scores"]["thesis_dice"] == pytest.approx(OOF_THESIS_DICE, rel=1e-3)
    assert oof["rules"]["searched"]["scores"]["kaggle"] == pytest.approx(0.8125)
    rewritten = json.loads((old_run / "postprocess.json").read_text())
    recorded = json.loads((FIXTURE / "run" / "postprocess.json").read_text())
    assert rewritten["thresholds"] == recorded["thresholds"] and rewritten["min_areas"] == recorded["min_areas"]
    assert rewritten["checkpoint_sha256"] == recorded["checkpoint_sha256"]


def test_old_run_exports_to_onnx_that_the_engine_serves(old_run: Path, tmp_path: Path) -> None:
    from engine.backends import load_backend

    model, report = tmp_path / "model.onnx", tmp_path / "export.json"
    argv = ["export", "--run", str(old_run), "--out", str(model), "--data", str(DATA), "--with-probs",
            "--report", str(report)]
    assert main(argv) == 0
    exported = json.loads(report.read_text())
    assert exported["fold_ids"] == [0, 1] and all(p["passed"] for p in exported["parity"])
    assert exported["metadata"]["thresholds"] == [0.1] * 4 and exported["metadata"]["min_areas"] == [1] * 4
    assert exported["drift"] is not None

    frames = np.stack([np.asarray(Image.open(DATA / "train_images" / name).convert("L")) for name in FRAMES])
    with load_backend(model, device="cpu", backend="onnxruntime", threads=1) as backend:
        result = backend.infer(frames)
    assert result.masks.shape == (4, 4, 64, 320)
    np.testing.assert_allclose(result.probs.mean(axis=(2, 3)), MEAN_PROBS, rtol=1e-4, atol=1e-6)
    assert result.counts.tolist() == [[0] * 4] * 4
