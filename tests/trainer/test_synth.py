"""Synthetic line data: class mix, masks that are exactly the drawn shapes, determinism, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import rle
from trainer.cli import main as trainer_main
from trainer.data import DataConfig, load_samples, sample_masks
from trainer.samples import label_matrix
from trainer.synth import draw_frame, synthesize


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_a_defect_changes_only_the_pixels_of_its_mask(kind: int) -> None:
    """Same seed with and without a defect: the background is drawn first from the same generator,
    so the frames differ exactly where the defect was drawn."""
    for seed in range(3):
        plain, no_masks = draw_frame(np.random.default_rng([seed, 1]), 128, 800, (), 4)
        image, masks = draw_frame(np.random.default_rng([seed, 1]), 128, 800, (kind,), 4)
        assert not no_masks.any()
        changed = image != plain
        assert masks[kind].any() and not np.delete(masks, kind, axis=0).any()
        assert not (changed & (masks[kind] == 0)).any(), "pixels changed outside the mask"
        # Stains fade to nothing at their outline; every kind visibly changes most of its mask.
        assert changed[masks[kind] == 1].mean() > 0.6


def test_two_defects_never_share_a_pixel() -> None:
    for seed in range(10):
        _, masks = draw_frame(np.random.default_rng([seed, 2]), 64, 320, (1, 3), 4)
        assert masks.sum(axis=0).max() == 1
        assert masks[1].any() and masks[3].any()


def test_defects_at_full_resolution_exceed_the_default_min_area() -> None:
    """At 256x1600 the default 200-pixel minimum area should remove specks, not defects."""
    for kind in range(4):
        areas = [
            draw_frame(np.random.default_rng([7, s]), 256, 1600, (kind,), 4)[1][kind].sum() for s in range(6)
        ]
        assert min(areas) >= 200, (kind + 1, areas)


def test_fixture_set_has_the_line_class_mix(synth_dir: Path, synth_cfg: DataConfig) -> None:
    samples = load_samples(synth_dir, synth_cfg)
    labels = label_matrix(samples, 4)
    counts = labels.sum(axis=0)
    assert len(samples) == 48
    assert counts.argmax() == 2 and counts.argmin() == 1  # class 3 most common, class 2 rarest
    assert 0.84 <= 1 - labels.mean() <= 0.86  # empty (image, class) pairs
    assert (labels.sum(axis=1) == 2).sum() == 2 and labels.sum(axis=1).max() == 2
    for sample in samples:
        assert sample_masks(sample, synth_cfg).sum(axis=0).max() <= 1
    assert (synth_dir / "synth.json").exists()


def test_csv_is_new_layout_sorted_and_round_trips(synth_dir: Path) -> None:
    lines = (synth_dir / "train.csv").read_text().splitlines()
    assert lines[0] == "ImageId,ClassId,EncodedPixels"
    rows = [line.split(",") for line in lines[1:]]
    assert rows == sorted(rows, key=lambda r: (r[0], int(r[1])))
    for _, _, encoded in rows:
        assert encoded and rle.encode(rle.decode(encoded, 64, 320)) == encoded


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", 6, 64, 320, seed=3)
    b = synthesize(tmp_path / "b", 6, 64, 320, seed=3)
    c = synthesize(tmp_path / "c", 6, 64, 320, seed=4)
    assert (a / "train.csv").read_text() == (b / "train.csv").read_text()
    names = sorted(p.name for p in (a / "train_images").iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in (b / "train_images").iterdir())
    for name in names:
        assert (a / "train_images" / name).read_bytes() == (b / "train_images" / name).read_bytes()
    assert (a / "train.csv").read_text() != (c / "train.csv").read_text()


def test_refuses_to_mix_with_an_earlier_set(tmp_path: Path) -> None:
    out = synthesize(tmp_path / "d", 8, 64, 320, seed=0)
    with pytest.raises(FileExistsError, match="already holds a data set"):
        synthesize(out, 4, 64, 320, seed=1)
    (out / "folds.csv").write_text("ImageId,fold,labels\n")
    synthesize(out, 4, 64, 320, seed=1, overwrite=True)
    assert len(list((out / "train_images").iterdir())) == 4 and not (out / "folds.csv").exists()
    assert len(load_samples(out, DataConfig(height=64, width=320))) == 4


def test_fewer_classes(tmp_path: Path) -> None:
    out = synthesize(tmp_path / "two", 20, 64, 320, seed=0, num_classes=2)
    samples = load_samples(out, DataConfig(num_classes=2, height=64, width=320))
    assert label_matrix(samples, 2).sum(axis=0).tolist() == [2, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": 0}, "--images must be >= 1"),
        ({"num_classes": 5}, "--classes must be 1..4"),
        ({"height": 8}, "at least 16x16"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"images": 2, "height": 64, "width": 320} | kwargs
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path / "bad", **args)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["synth", "--out", str(out), "--images", "10", "--height", "64", "--width", "320", "--seed", "2"]
    assert trainer_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote 10 frames of 64x320 to {out}" in printed and "class 3 scratches" in printed
    assert trainer_main(argv) == 2
    assert "already holds a data set" in capsys.readouterr().err
    assert trainer_main(argv + ["--force"]) == 0
