"""``trainer evaluate`` on a tiny trained run: out-of-fold search, holdout, exported-model scoring, overlays."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from network.checkpoint import fold_metadata, load_fold
from network.inspection import InspectionModel
from trainer.config import FitConfig, FitOptions, FitSettings, resolve
from trainer.data import SeverstalDataset, load_samples
from trainer.evaluate import DECISION_SCORES, decision_scores, evaluate_run
from trainer.fit import run_fit
from trainer.metrics import PixelStats, kaggle_metric, mask_stats
from trainer.splits import HOLDOUT, read_folds


@pytest.fixture(scope="module")
def trained_run(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two folds, two epochs each, of a tiny U-Net on the 48 synthetic 64x320 frames."""
    torch.set_num_threads(1)
    cfg = resolve(FitSettings(data=[str(synth_dir)], encoder="resnet18", encoder_weights="none", encoder_depth=3,
                            decoder_channels=(16, 8, 4), folds=2, holdout=0.15, epochs=2, batch_size=8))
    out = tmp_path_factory.mktemp("evaluate") / "run"
    run_fit(cfg, FitOptions(out=str(out), device="cpu", workers=0, progress=False))
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_oof_search_scores_each_image_with_its_own_fold_and_writes_postprocess(trained_run: Path,
                                                                               tmp_path: Path) -> None:
    run = _copy(trained_run, tmp_path)
    result = evaluate_run(run, split="oof", device="cpu")

    assignment = read_folds(run / "folds.csv")
    assert result["images"] == sum(1 for f in assignment.values() if f != HOLDOUT)
    before = result["rules"]["thesis"]["scores"]["kaggle"]
    after = result["rules"]["searched"]["scores"]["kaggle"]
    assert after >= before  # the baseline is a point of the searched grid
    post = json.loads((run / "postprocess.json").read_text())
    assert post["thresholds"] == result["rules"]["searched"]["thresholds"] and len(post["min_areas"]) == 4
    assert post["kaggle_before"] == pytest.approx(before) and post["kaggle_after"] == pytest.approx(after)
    assert len(post["checkpoint_sha256"]) == 2

    # Recompute the baseline score independently: each fold's checkpoint on exactly its own validation images.
    cfg = FitConfig.from_dict(json.loads((run / "config.json").read_text()))
    samples = load_samples([Path(d) for d in cfg.data], cfg.frames)
    parts = []
    for fold in (0, 1):
        unet, ucfg, facts = load_fold(run / f"fold{fold}" / "best.pt")
        model = InspectionModel([unet], fold_metadata(facts, ucfg)).eval()
        group = [s for s in samples if assignment[s.image_id] == fold]
        dataset = SeverstalDataset(group, cfg.frames)
        frames = torch.stack([dataset[i][0] for i in range(len(group))])
        truth = torch.stack([dataset[i][1] for i in range(len(group))])
        with torch.inference_mode():
            masks, _, present = model(frames)
        parts.append(mask_stats(masks, truth, present=present))
    assert kaggle_metric(PixelStats.concatenate(parts)) == pytest.approx(before, abs=1e-12)

    assert (run / "evaluations" / "oof.json").is_file()
    report = (run / "report.md").read_text()
    assert "Post-processing (searched on out-of-fold predictions)" in report and "## Evaluation: oof" in report


def test_holdout_of_the_exported_onnx_scores_like_the_eager_ensemble(trained_run: Path, tmp_path: Path) -> None:
    from trainer.export import export_onnx

    run = _copy(trained_run, tmp_path)
    eager = evaluate_run(run, split="holdout", device="cpu")
    onnx_path = tmp_path / "model.onnx"
    export_onnx(run, onnx_path)
    exported = evaluate_run(run, split="holdout", model_path=onnx_path, device="cpu")

    assert exported["images"] == eager["images"] == sum(1 for f in read_folds(run / "folds.csv").values()
                                                         if f == HOLDOUT)
    e, x = eager["rules"]["model"]["scores"], exported["rules"]["model"]["scores"]
    # ONNX Runtime and eager torch agree on probabilities to ~1e-6 (float32 reassociation), so only a
    # pixel within that of a threshold could flip: allow the Kaggle metric 1e-3, labels must match.
    assert x["kaggle"] == pytest.approx(e["kaggle"], abs=1e-3)
    assert x["confusion"] == e["confusion"]
    assert exported["loss"] is None and eager["loss"] > 0  # the exported graph has no probs output
    assert (run / "evaluations" / "holdout-model.onnx.json").is_file()

    # The all-empty baseline is the fraction of empty (image, class) pairs, from the labels alone.
    cfg = FitConfig.from_dict(json.loads((run / "config.json").read_text()))
    holdout = [s for s in load_samples([Path(d) for d in cfg.data], cfg.frames)
               if read_folds(run / "folds.csv")[s.image_id] == HOLDOUT]
    empty_pairs = np.mean([[not r for r in s.rles] for s in holdout])
    assert eager["empty_kaggle"] == pytest.approx(empty_pairs)


def test_cli_holdout_with_json_and_overlays(trained_run: Path, tmp_path: Path, capsys) -> None:
    from trainer.cli import main

    run = _copy(trained_run, tmp_path)
    out_json = tmp_path / "holdout.json"
    rc = main(["evaluate", "--run", str(run), "--json", str(out_json), "--render", "2", "--workers", "0",
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert "holdout:" in capsys.readouterr().out
    assert len(result["renders"]) == 2
    for path in result["renders"]:
        picture = cv2.imread(path)
        # truth panel and prediction panel under their headers, then a title and one caption line per class
        assert picture.shape[0] == 16 + 64 + 16 + 64 + 16 * 5 + 4
        assert picture.shape[1] >= 320
        assert re.fullmatch(r"[0-9a-f]+_((TP|FP|FN)[1-4](-(TP|FP|FN)[1-4])*|TN)\.png", Path(path).name), path
    assert "## Evaluation: holdout" in (run / "report.md").read_text()


def test_bad_requests_are_named(trained_run: Path, tmp_path: Path) -> None:
    run = _copy(trained_run, tmp_path)
    with pytest.raises(ValueError, match="drop --model for oof"):
        evaluate_run(run, split="oof", model_path=tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError, match="is not a training run"):
        evaluate_run(tmp_path, split="holdout")


@contextlib.contextmanager
def serving(model: Path):
    """A real InspectionServer on 127.0.0.1 (free port), on its own event loop thread."""
    import asyncio
    import threading

    from engine.backends import load_backend
    from server.service import InspectionServer, ServerConfig

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = InspectionServer(lambda: load_backend(model, device="cpu"), ServerConfig(port=0, metrics_port=None))
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=60)
    try:
        yield server.port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=10), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def test_streamed_predictions_csv_scores_exactly_like_the_exported_model(trained_run: Path, tmp_path: Path,
                                                                         capsys) -> None:
    from server.cli import main as server_main
    from trainer.cli import main as trainer_main
    from trainer.export import export_onnx

    run = _copy(trained_run, tmp_path)
    onnx_path = tmp_path / "model.onnx"
    export_onnx(run, onnx_path)
    cfg = FitConfig.from_dict(json.loads((run / "config.json").read_text()))
    holdout_ids = [k for k, f in read_folds(run / "folds.csv").items() if f == HOLDOUT]
    cameras = tmp_path / "holdout" / "train_images"
    cameras.mkdir(parents=True)
    for image_id in holdout_ids:
        shutil.copy(Path(cfg.data[0]) / "train_images" / image_id, cameras / image_id)

    csv_path = tmp_path / "streamed.csv"
    with serving(onnx_path) as port:
        assert server_main(["client", "--target", f"127.0.0.1:{port}", "--images", str(cameras.parent),
                            "--streams", "3", "--out", str(csv_path)]) == 0
    assert trainer_main(["evaluate", "--run", str(run), "--predictions", str(csv_path),
                         "--json", str(tmp_path / "streamed.json")]) == 0
    assert "as in the predictions" in capsys.readouterr().out
    streamed = json.loads((tmp_path / "streamed.json").read_text())
    direct = evaluate_run(run, split="holdout", model_path=onnx_path, device="cpu")

    assert streamed["images"] == direct["images"] == len(holdout_ids)
    # Same model, same decoded frames: the gated figures agree exactly. (The thesis Dice scores the
    # raw masks of absent classes too, which a submission CSV by design does not carry.)
    s, d = decision_scores(streamed), decision_scores(direct)
    assert set(s) == set(DECISION_SCORES) and s["confusion"]["per_class"]
    assert s == d
    with pytest.raises(ValueError, match="not a 'trainer evaluate' result"):
        decision_scores({"kaggle": 0.9})
    with pytest.raises(ValueError, match="lack label_accuracy"):
        decision_scores({"primary": "model", "rules": {"model": {"scores": {
            k: v for k, v in s.items() if k != "label_accuracy"}}}})


def test_predictions_csv_must_cover_every_scored_image(trained_run: Path, tmp_path: Path) -> None:
    run = _copy(trained_run, tmp_path)
    csv_path = tmp_path / "partial.csv"
    csv_path.write_text("ImageId,ClassId,EncodedPixels\n")
    with pytest.raises(ValueError, match="has no rows for .* holdout images"):
        evaluate_run(run, split="holdout", predictions_path=csv_path)
    with pytest.raises(ValueError, match="oof tunes post-processing"):
        evaluate_run(run, split="oof", predictions_path=csv_path)
    with pytest.raises(ValueError, match="not both"):
        evaluate_run(run, split="holdout", predictions_path=csv_path, model_path=csv_path)


def test_oof_on_a_partial_run_scores_the_trained_folds_with_a_warning(trained_run: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """'trainer fit --fold 0' alone: the out-of-fold search runs on fold 0's validation images."""
    run = _copy(trained_run, tmp_path)
    shutil.rmtree(run / "fold1")
    with caplog.at_level("WARNING", logger="trainer.evaluate"):
        result = evaluate_run(run, split="oof", device="cpu")
    assert "only 1 of the run's 2 folds have a best.pt" in caplog.text
    assignment = read_folds(run / "folds.csv")
    assert result["images"] == sum(1 for f in assignment.values() if f == 0)
    post = json.loads((run / "postprocess.json").read_text())
    assert post["scored_folds"] == [0] and len(post["checkpoint_sha256"]) == 1
    assert post["kaggle_after"] >= post["kaggle_before"]
    shutil.rmtree(run / "fold0")
    with pytest.raises(FileNotFoundError, match="no fold checkpoints"):
        evaluate_run(run, split="oof", device="cpu")


def test_tta_of_the_oof_search_is_what_holdout_and_export_use(trained_run: Path, tmp_path: Path) -> None:
    from engine.metadata import read_onnx_metadata
    from trainer.export import export_onnx

    run = _copy(trained_run, tmp_path)
    plain = evaluate_run(run, split="oof", device="cpu")
    flipped = evaluate_run(run, split="oof", device="cpu", tta="hflip")
    assert json.loads((run / "postprocess.json").read_text())["tta"] == "hflip"
    assert flipped["loss"] != plain["loss"]  # the folds saw other inputs
    holdout = evaluate_run(run, split="holdout", device="cpu")
    assert holdout["metadata"]["tta"] == "hflip"
    export_onnx(run, tmp_path / "model.onnx", drift_frames=0)
    assert read_onnx_metadata(str(tmp_path / "model.onnx")).tta == "hflip"
    export_onnx(run, tmp_path / "plain.onnx", drift_frames=0, tta="none")  # told otherwise: a warning, not refused
    assert read_onnx_metadata(str(tmp_path / "plain.onnx")).tta == "none"
