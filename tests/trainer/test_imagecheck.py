"""Training images are checked before training starts (trainer/imagecheck.py, through ``trainer fit``):
a truncated JPEG, a wrong-size image and a non-image in a synthetic data folder, all named in one error."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import cv2
import pytest

from tests.fixtures import SYNTH_SIZE
from tests.jpeg_faults import truncated_mid_scan
from trainer import imagecheck

FIT = ["--encoder", "resnet18", "--encoder-weights", "none", "--encoder-depth", "3", "--folds", "2",
       "--epochs", "1", "--device", "cpu", "--workers", "0", "--no-progress"]


@pytest.fixture()
def broken_data(synth_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the synthetic folder with three bad images; the bad file names -> what the error must say."""
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    images = sorted((data / "train_images").glob("*.jpg"))
    # The wrong-size image sorts first: it must be reported, not taken as the frame size.
    first, truncated, text = images[0], images[5], images[9]
    image = cv2.imread(str(first), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(first), cv2.resize(image, (SYNTH_SIZE[1] // 2, SYNTH_SIZE[0] // 2)))
    truncated.write_bytes(truncated_mid_scan(truncated.read_bytes()))
    text.write_text("not an image, whatever its name says\n")
    return data, {
        first.name: f"is {SYNTH_SIZE[1] // 2}x{SYNTH_SIZE[0] // 2} (width x height)",
        truncated.name: "JPEG image is corrupt or truncated",
        text.name: "neither JPEG nor PNG",
    }


def test_fit_names_every_bad_image_before_training(broken_data, tmp_path, capsys):
    from trainer.cli import main

    data, expected = broken_data
    started = time.perf_counter()
    rc = main(["fit", "--data", str(data), "--out", str(tmp_path / "run"), *FIT])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "trainer fit: error: 3 of 48 training images are unusable" in err, err
    for name, reason in expected.items():
        line = next((ln for ln in err.splitlines() if name in ln), None)
        assert line is not None and reason in line, (name, err)
    assert "--scale" not in err and "Traceback" not in err
    assert not (tmp_path / "run" / "fold0").exists()  # nothing trained
    print(f"checked and refused in {elapsed:.2f} s")  # reported, not asserted (shared CPU)


def test_frame_size_is_the_most_common_one(broken_data):
    data, _ = broken_data
    assert imagecheck.frame_size(data) == SYNTH_SIZE


def test_intact_folder_passes(synth_dir):
    paths = imagecheck.image_files(synth_dir)
    assert imagecheck.check_images(paths, SYNTH_SIZE, workers=2) == []
    assert imagecheck.check_training_images([synth_dir], SYNTH_SIZE) == len(paths) == 48
