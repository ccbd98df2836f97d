"""The Severstal data layer: both CSV layouts, every bad-input error, samples and the dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engine import rle
from engine.metadata import DEFAULT_CLASS_NAMES
from trainer.data import (
    DataConfig,
    SeverstalDataset,
    load_samples,
    read_annotations,
    read_image,
    sample_masks,
)
from trainer.samples import Sample, label_matrix

H, W = 16, 40
CFG = DataConfig(num_classes=4, height=H, width=W)


def _mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


RLE_A1 = rle.encode(_mask(2, 6, 3, 9))
RLE_A3 = rle.encode(_mask(8, 12, 20, 30))
RLE_B2 = rle.encode(_mask(0, 16, 35, 40))


def _write_dir(root: Path, csv_text: str, names=("a.jpg", "b.jpg", "c.png"), size=(H, W)) -> Path:
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        cv2.imwrite(str(root / "train_images" / name), rng.integers(0, 255, size, dtype=np.uint8))
    (root / "train.csv").write_text(csv_text)
    return root


NEW_CSV = f"ImageId,ClassId,EncodedPixels\na.jpg,1,{RLE_A1}\na.jpg,3,{RLE_A3}\nb.jpg,2,{RLE_B2}\n"
OLD_CSV = (
    "ImageId_ClassId,EncodedPixels\n"
    + "".join(f"a.jpg_{k},{r}\n" for k, r in zip(range(1, 5), [RLE_A1, "", RLE_A3, ""]))
    + "".join(f"b.jpg_{k},{r}\n" for k, r in zip(range(1, 5), ["", RLE_B2, "", ""]))
    + "".join(f"c.png_{k},\n" for k in range(1, 5))
)


def test_config_defaults_and_class_names() -> None:
    assert DataConfig().class_names == DEFAULT_CLASS_NAMES
    assert DataConfig(num_classes=2).class_names == ("class 1", "class 2")
    assert DataConfig(height=256, width=1600).scaled_size(0.5) == (128, 800)
    with pytest.raises(ValueError, match="class_names has 1 names, expected num_classes=2"):
        DataConfig(num_classes=2, class_names=("x",))


def test_both_layouts_give_the_same_samples(tmp_path: Path) -> None:
    new = load_samples(_write_dir(tmp_path / "new", NEW_CSV), CFG)
    old = load_samples(_write_dir(tmp_path / "old", OLD_CSV), CFG)
    assert [s.image_id for s in new] == ["a.jpg", "b.jpg", "c.png"]
    assert [(s.image_id, s.rles) for s in new] == [(s.image_id, s.rles) for s in old]
    assert [s.labels for s in new] == [(1, 3), (2,), ()]
    np.testing.assert_array_equal(sample_masks(new[0], CFG)[0], _mask(2, 6, 3, 9))
    np.testing.assert_array_equal(sample_masks(new[0], CFG)[2], _mask(8, 12, 20, 30))
    assert not sample_masks(new[2], CFG).any()
    np.testing.assert_array_equal(label_matrix(new, 4), [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])


def test_read_annotations_lists_every_named_image(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text(OLD_CSV)
    rows = read_annotations(path, 4, H, W)
    assert rows == {
        "a.jpg": [RLE_A1, "", RLE_A3, ""],
        "b.jpg": ["", RLE_B2, "", ""],
        "c.png": ["", "", "", ""],
    }


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("Image,Class,Pixels\n", r"train\.csv:1: unexpected header"),
        ("", r"train\.csv: empty file"),
        (
            f"ImageId,ClassId,EncodedPixels\na.jpg,5,{RLE_A1}\n",
            r"train\.csv:2: ClassId 5 out of range 1\.\.4",
        ),
        (f"ImageId,ClassId,EncodedPixels\na.jpg,0,{RLE_A1}\n", r"train\.csv:2: ClassId 0 out of range"),
        (
            f"ImageId,ClassId,EncodedPixels\na.jpg,x,{RLE_A1}\n",
            r"train\.csv:2: ClassId 'x' is not an integer",
        ),
        (
            f"ImageId,ClassId,EncodedPixels\na.jpg,1,{RLE_A1}\nb.jpg,2,{RLE_B2}\na.jpg,1,{RLE_A1}\n",
            r"train\.csv:4: duplicate row for image a\.jpg class 1 \(first at line 2\)",
        ),
        (
            "ImageId,ClassId,EncodedPixels\na.jpg,1,630 20\n",
            r"train\.csv:2: malformed EncodedPixels for image a\.jpg class 1: .*past the 16x40 mask",
        ),
        ("ImageId,ClassId,EncodedPixels\na.jpg,1,5 2 3\n", r"train\.csv:2: malformed .*odd number of tokens"),
        (
            "ImageId,ClassId,EncodedPixels\na.jpg,1,9 2 3 1\n",
            r"train\.csv:2: malformed .*unsorted or overlapping",
        ),
        ("ImageId,ClassId,EncodedPixels\na.jpg,1\n", r"train\.csv:2: expected 3 fields"),
        (
            "ImageId_ClassId,EncodedPixels\na.jpg,1 2\n",
            r"train\.csv:2: ImageId_ClassId 'a\.jpg' is not of the form",
        ),
        (
            "ImageId_ClassId,EncodedPixels\na.jpg_1,\na.jpg_1,\n",
            r"train\.csv:3: duplicate row for image a\.jpg",
        ),
    ],
    ids=[
        "bad-header",
        "empty-file",
        "class-too-high",
        "class-zero",
        "class-not-int",
        "duplicate",
        "rle-past-frame",
        "rle-odd-tokens",
        "rle-overlap",
        "field-count",
        "old-layout-key",
        "old-duplicate",
    ],
)
def test_bad_csv_is_reported_with_file_and_line(tmp_path: Path, csv_text: str, message: str) -> None:
    data = _write_dir(tmp_path, csv_text)
    with pytest.raises(ValueError, match=message):
        load_samples(data, CFG)


def test_row_for_missing_image_names_line_and_image(tmp_path: Path) -> None:
    data = _write_dir(tmp_path, NEW_CSV + f"zzz.jpg,4,{RLE_A1}\n")
    with pytest.raises(FileNotFoundError, match=r"train\.csv:5: image zzz\.jpg not found in .*train_images"):
        load_samples(data, CFG)


def test_missing_folder_parts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data folder .*nowhere does not exist"):
        load_samples(tmp_path / "nowhere", CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no train_images/"):
        load_samples(tmp_path / "empty", CFG)
    data = _write_dir(tmp_path / "nocsv", NEW_CSV)
    (data / "train.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"annotations file .*nocsv/train\.csv does not exist"):
        load_samples(data, CFG)


def test_several_folders_union_and_duplicate_image(tmp_path: Path) -> None:
    first = _write_dir(tmp_path / "line1", NEW_CSV)
    second = _write_dir(tmp_path / "line2", "ImageId,ClassId,EncodedPixels\n", names=("d.jpg",))
    samples = load_samples([second, first], CFG)
    assert [s.image_id for s in samples] == ["a.jpg", "b.jpg", "c.png", "d.jpg"]
    assert samples[3].source == second and samples[0].source == first
    clash = _write_dir(tmp_path / "line3", "ImageId,ClassId,EncodedPixels\n", names=("b.jpg",))
    with pytest.raises(ValueError, match=r"image b\.jpg is in two data folders: .*line1 and .*line3"):
        load_samples([first, clash], CFG)


def test_read_image_errors(tmp_path: Path) -> None:
    data = _write_dir(tmp_path, NEW_CSV)
    assert read_image(data / "train_images" / "a.jpg", CFG).shape == (H, W)
    broken = data / "train_images" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg cannot be read"):
        read_image(broken, CFG)
    with pytest.raises(FileNotFoundError, match=r"gone\.jpg does not exist"):
        read_image(data / "train_images" / "gone.jpg", CFG)
    cv2.imwrite(str(data / "train_images" / "big.png"), np.zeros((H, W + 1), np.uint8))
    with pytest.raises(ValueError, match=r"big\.png is 41x16 \(width x height\), expected 40x16"):
        read_image(data / "train_images" / "big.png", CFG)


def test_dataset_reports_wrong_size_image_by_file(tmp_path: Path) -> None:
    data = _write_dir(tmp_path, NEW_CSV, size=(H + 2, W))
    dataset = SeverstalDataset(load_samples(data, CFG), CFG)
    with pytest.raises(ValueError, match=r"a\.jpg is 40x18 \(width x height\), expected 40x16"):
        dataset[0]


def test_reads_three_channel_jpeg_as_gray(tmp_path: Path) -> None:
    data = _write_dir(tmp_path, NEW_CSV)
    gray = np.tile(np.arange(W, dtype=np.uint8) * 6, (H, 1))
    cv2.imwrite(str(data / "train_images" / "a.png"), np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(read_image(data / "train_images" / "a.png", CFG), gray)


def test_synth_loads_through_the_dataset(synth_dir: Path, synth_cfg: DataConfig) -> None:
    samples = load_samples(synth_dir, synth_cfg)
    assert len(samples) == 48
    assert [s.image_id for s in samples] == sorted(s.image_id for s in samples)
    counts = label_matrix(samples, 4).sum(axis=0)
    assert counts.tolist() == [6, 3, 15, 5]
    for scale, (h, w) in [(1.0, (64, 320)), (0.5, (32, 160))]:
        dataset = SeverstalDataset(samples, synth_cfg, scale=scale)
        assert len(dataset) == 48
        image, masks = dataset[1]
        assert image.dtype == torch.uint8 and image.shape == (h, w)
        assert masks.dtype == torch.uint8 and masks.shape == (4, h, w)
        assert set(torch.unique(masks).tolist()) <= {0, 1}


def test_dataset_downscale_is_a_box_filter_and_half_area_rule(synth_dir: Path, synth_cfg: DataConfig) -> None:
    """At scale 0.5 a pixel is the rounded mean of its 2x2 block; a mask pixel is set when >= 2 of 4 are."""
    sample = next(s for s in load_samples(synth_dir, synth_cfg) if len(s.labels) == 2)
    image, masks = SeverstalDataset([sample], synth_cfg, scale=0.5)[0]
    full = read_image(sample.path, synth_cfg).astype(np.float64)
    blocks = full.reshape(32, 2, 160, 2).mean(axis=(1, 3))
    # Round-half-to-even vs float32 summation can differ by one grey level on .5 means.
    assert np.abs(image.numpy().astype(np.float64) - np.round(blocks)).max() <= 1
    full_masks = sample_masks(sample, synth_cfg)
    expected = full_masks.reshape(4, 32, 2, 160, 2).sum(axis=(2, 4)) >= 2
    np.testing.assert_array_equal(masks.numpy(), expected.astype(np.uint8))
    at_full = SeverstalDataset([sample], synth_cfg)[0]
    np.testing.assert_array_equal(at_full[1].numpy(), full_masks)
    np.testing.assert_array_equal(at_full[0].numpy(), full.astype(np.uint8))


def test_dataset_applies_the_named_transform(synth_dir: Path, synth_cfg: DataConfig) -> None:
    sample = next(s for s in load_samples(synth_dir, synth_cfg) if s.labels)
    plain_image, plain_masks = SeverstalDataset([sample], synth_cfg)[0]
    image, masks = SeverstalDataset([(sample, "hflip")], synth_cfg)[0]
    assert torch.equal(image, plain_image.flip(-1)) and torch.equal(masks, plain_masks.flip(-1))
    with pytest.raises(ValueError, match="unknown transform 'spin'"):
        SeverstalDataset([(sample, "spin")], synth_cfg)


def test_sample_with_wrong_class_count_is_rejected(tmp_path: Path) -> None:
    sample = Sample("a.jpg", tmp_path / "a.jpg", ("", ""), tmp_path)
    with pytest.raises(ValueError, match="image a.jpg has 2 class masks, expected 4"):
        label_matrix([sample], 4)


def test_copy_of_synth_in_old_layout_matches(tmp_path: Path, synth_dir: Path, synth_cfg: DataConfig) -> None:
    samples = load_samples(synth_dir, synth_cfg)
    copy = tmp_path / "old"
    shutil.copytree(synth_dir / "train_images", copy / "train_images")
    lines = ["ImageId_ClassId,EncodedPixels"]
    lines += [f"{s.image_id}_{k + 1},{r}" for s in samples for k, r in enumerate(s.rles)]
    (copy / "train.csv").write_text("\n".join(lines) + "\n")
    old = load_samples(copy, synth_cfg)
    assert [(s.image_id, s.rles) for s in old] == [(s.image_id, s.rles) for s in samples]


def test_read_image_decodes_like_the_server(tmp_path: Path) -> None:
    """Training reads frames with the server's decoder: an EXIF orientation tag rotates nothing, and a
    JPEG cut mid-scan is refused (OpenCV would fill the missing rows with grey)."""
    from tests.jpeg_faults import truncated_mid_scan, with_orientation

    data = _write_dir(tmp_path, NEW_CSV)
    intact = (data / "train_images" / "a.jpg").read_bytes()
    rotated = data / "train_images" / "rotated.jpg"
    rotated.write_bytes(with_orientation(intact, 3))
    np.testing.assert_array_equal(read_image(rotated, CFG), read_image(data / "train_images" / "a.jpg", CFG))
    cut = data / "train_images" / "cut.jpg"
    cut.write_bytes(truncated_mid_scan(intact))
    with pytest.raises(ValueError, match=r"cut\.jpg cannot be read: JPEG image is corrupt or truncated"):
        read_image(cut, CFG)
