"""Crop training (``trainer fit --crop HxW``): defect-aware crops, seeded, whole-frame validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.commands.fit import parse_crop
from trainer.config import FitOptions, FitSettings, resolve
from trainer.crops import CropSampler


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 frames 32x160, class 3 (index 2) a 2x2 spot at a different place in each, class 1 everywhere in frame 0."""
    x = torch.arange(8 * 32 * 160, dtype=torch.float32).reshape(8, 1, 32, 160)
    y = torch.zeros(8, 4, 32, 160)
    for i in range(8):
        y[i, 2, 3 * i:3 * i + 2, 18 * i:18 * i + 2] = 1
    y[0, 0] = 1
    return x, y


def test_crops_centre_on_the_rarest_class_present_and_move_image_and_masks_together() -> None:
    x, y = _batch()
    crops = CropSampler((16, 48), rarity=[2, 3, 1, 0], seed=0, fold=0, defect_p=1.0)
    cx, cy = crops(x, y, epoch=1, batch=0)
    assert cx.shape == (8, 1, 16, 48) and cy.shape == (8, 4, 16, 48)
    assert (cy[:, 2].flatten(1).sum(1) > 0).all()  # every crop holds its frame's rare spot
    for i, (top, left) in enumerate(crops.origins(y, 1, 0)):
        assert torch.equal(cx[i], x[i, :, top:top + 16, left:left + 48])
        assert torch.equal(cy[i], y[i, :, top:top + 16, left:left + 48])


def test_crops_are_seeded_per_epoch_and_batch() -> None:
    _, y = _batch()
    crops = CropSampler((16, 48), rarity=[2, 3, 1, 0], seed=0, fold=0, defect_p=0.0)
    assert crops.origins(y, 1, 0) == crops.origins(y, 1, 0)
    assert crops.origins(y, 1, 0) != crops.origins(y, 2, 0)
    assert CropSampler((16, 48), [2, 3, 1, 0], seed=0, fold=1, defect_p=0.0).origins(y, 1, 0) != \
        crops.origins(y, 1, 0)


def test_parse_crop_names_bad_values() -> None:
    assert parse_crop("64x256") == (64, 256)
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_crop("64,256")


def test_fit_on_crops_validates_and_saves_whole_frame_folds(synth_dir: Path, tmp_path: Path) -> None:
    from network.checkpoint import load_fold
    from trainer.config import FitOptions, FitSettings, resolve
    from trainer.fit import run_fit
    from trainer.rundir import read_metrics

    torch.set_num_threads(1)
    values = dict(data=[str(synth_dir)], encoder="resnet18", encoder_weights="none", encoder_depth=3,
                  decoder_channels=(16, 8, 4), folds=2, holdout=0.15, epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="within the training size 32x160"):
        resolve(FitSettings(**values, crop=(48, 64)))
    cfg = resolve(FitSettings(**values, crop=(20, 60), crop_defect_p=0.3))  # not a multiple of the stride: padded
    out = tmp_path / "run"
    run_fit(cfg, FitOptions(out=str(out), fold=0, device="cpu", workers=0, progress=False))
    saved = json.loads((out / "config.json").read_text())
    assert saved["crop"] == [20, 60] and saved["crop_defect_p"] == 0.3
    assert len(read_metrics(out / "fold0" / "metrics.csv")) == 1
    _, _, facts = load_fold(out / "fold0" / "best.pt")
    assert facts.train_size == (32, 160)  # the whole-frame training size: export builds the graph from it


def test_crop_training_re_estimates_batchnorm_statistics_on_whole_frames(synth_dir: Path, tmp_path: Path) -> None:
    """After an epoch on crops, the BatchNorm statistics are those of whole training frames: the
    first layer's running mean is the mean of its input over the recalibration frames."""
    from network.processing import scaled_input
    from trainer.data import load_samples
    from trainer.distributed import setup_distributed
    from trainer.fit import split_fold
    from trainer.folddata import RECALIBRATION_FRAMES
    from trainer.loop import FoldTrainer
    from trainer.rundir import FoldPaths
    from trainer.splits import make_folds

    torch.set_num_threads(1)
    cfg = resolve(FitSettings(data=[str(synth_dir)], encoder="resnet18", encoder_weights="none", encoder_depth=3,
                            decoder_channels=(16, 8, 4), scale=0.5, folds=2, holdout=0.15, epochs=1,
                            batch_size=4, crop=(16, 32), balance=False))
    samples = load_samples(synth_dir, cfg.frames)
    train, val = split_fold(samples, make_folds(samples, 4, folds=2, holdout=0.15, seed=0), 0)
    opts = FitOptions(out=str(tmp_path / "run"), fold=0, device="cpu", workers=0, progress=False)
    trainer = FoldTrainer(cfg, opts, setup_distributed("cpu"), 0, FoldPaths.of(opts.out, 0), train, val)
    trainer.make_loaders()
    picks = trainer.data.recalibration
    assert 0 < len(picks) <= RECALIBRATION_FRAMES
    assert {s.image_id for s in picks} <= {s.image_id for s in train}
    trainer.train_epoch(1)
    bn, conv = trainer.unet.encoder.bn1, trainer.unet.encoder.conv1
    assert bn.momentum == 0.1  # restored after the re-estimation
    with torch.no_grad():
        batch_means = []
        for i in range(0, len(picks), cfg.optim.batch_size):
            frames = torch.stack([trainer.data.train_set.scaled(s)[0] for s in picks[i:i + cfg.optim.batch_size]])
            batch_means.append(conv(scaled_input(frames, trainer.meta)).mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_mean, torch.stack(batch_means).mean(dim=0), rtol=1e-4, atol=1e-5)
