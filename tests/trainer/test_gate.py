"""The empty-frame gate (``trainer fit --gate``): a class head trained on presence labels gates ``present`` in the graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from engine.metadata import read_onnx_metadata
from network.inspection import InspectionModel
from toolchain.parity import synthetic_frames
from trainer.config import FitOptions, FitSettings, resolve
from trainer.export import export_onnx
from trainer.fit import run_fit
from trainer.rundir import load_run


def test_gated_fold_trains_and_the_graph_requires_the_class_head_to_agree(synth_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = resolve(FitSettings(data=[str(synth_dir)], gate=True, encoder="resnet18", encoder_weights="none",
                            encoder_depth=3, decoder_channels=(16, 8, 4), folds=2, holdout=0.15, epochs=1,
                            batch_size=8))
    run = tmp_path / "run"
    run_fit(cfg, FitOptions(out=str(run), fold=0, device="cpu", workers=0, progress=False))
    frames = synthetic_frames(8, 64, 320, seed=5)
    loaded = load_run(run)
    assert loaded.config.gate and loaded.metadata.gate_thresholds == [0.5] * 4  # the default without a search
    with torch.no_grad():
        probs, gate = InspectionModel(loaded.folds, loaded.metadata).outputs(torch.from_numpy(frames))
    assert gate is not None and gate.shape == (8, 4)
    # Pixel thresholds that call every class present by count; gate thresholds at each class's median.
    thresholds = [round(float(np.quantile(probs[:, k].numpy(), 0.5)), 6) for k in range(4)]
    gate_thresholds = [float(np.median(gate[:, k].numpy())) for k in range(4)]
    (run / "postprocess.json").write_text(json.dumps({"thresholds": thresholds, "min_areas": [1] * 4,
                                                      "gate_thresholds": gate_thresholds}))
    model = tmp_path / "gated.onnx"
    export_onnx(run, model, drift_frames=0)  # parity of masks, counts and gated present against eager
    assert read_onnx_metadata(str(model)).gate_thresholds == gate_thresholds
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    counts, present = session.run(["counts", "present"], {"frames": frames})
    by_count = counts >= 1
    assert by_count.all()
    expected = by_count & (gate.numpy() >= np.asarray(gate_thresholds, dtype=np.float32))
    np.testing.assert_array_equal(present, expected)
    assert 0 < present.sum() < present.size  # the gate removed some classes the pixels alone would report

    # The gate's thresholds are searched out of fold (on the trained fold), after the pixel rule's.
    from trainer.evaluate import evaluate_run

    result = evaluate_run(run, split="oof", device="cpu")
    post = json.loads((run / "postprocess.json").read_text())
    assert len(post["gate_thresholds"]) == 4 and all(0 <= g <= 1 for g in post["gate_thresholds"])
    assert post["kaggle_after_gate"] >= post["kaggle_after"] - 1e-12  # 0 (no veto) is in the grid
    assert result["rules"]["searched"]["gate_thresholds"] == post["gate_thresholds"]
    assert load_run(run).metadata.gate_thresholds == post["gate_thresholds"]
