"""Class-balancing plan and the image + mask transforms."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.balance import TRANSFORMS, apply_transform, balance_plan, class_counts
from trainer.data import DataConfig, load_samples
from trainer.samples import Sample

H, W = 64, 320


def _marked(y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark frame with one bright 3x3 mark, and class 2's mask of exactly that mark."""
    image = np.full((H, W), 40, np.uint8)
    image[y - 1 : y + 2, x - 1 : x + 2] = 240
    masks = np.zeros((4, H, W), np.uint8)
    masks[1, y - 1 : y + 2, x - 1 : x + 2] = 1
    return image, masks


def _centroid(values: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(values)
    return np.array([ys.mean(), xs.mean()])


@pytest.mark.parametrize(
    ("name", "expected"),
    [("hflip", (20, W - 1 - 100)), ("vflip", (H - 1 - 20, 100)), ("rot180", (H - 1 - 20, W - 1 - 100))],
)
def test_flips_move_image_and_mask_together_exactly(name: str, expected: tuple[int, int]) -> None:
    image, masks = _marked(20, 100)
    out_image, out_masks = apply_transform(image, masks, name)
    assert out_image[expected] == 240 and out_masks[1][expected] == 1
    np.testing.assert_array_equal(out_masks[1], (out_image > 140).astype(np.uint8))
    assert out_masks.sum() == masks.sum()


@pytest.mark.parametrize("name", ["rot+10", "rot-10"])
def test_small_rotations_move_the_mark_with_its_mask(name: str) -> None:
    """The mark 60 px right of the centre turns by 10 degrees counter-clockwise (+10) or clockwise
    (-10). Tolerance 1 px: the 3x3 mark is resampled (bilinear image, nearest mask)."""
    cy, cx = (H - 1) / 2, (W - 1) / 2
    y, x = round(cy), round(cx) + 60
    image, masks = _marked(y, x)
    out_image, out_masks = apply_transform(image, masks, name)
    angle = math.radians(10.0 if name == "rot+10" else -10.0)
    dy, dx = y - cy, x - cx
    # Counter-clockwise on screen, where y points down.
    expected = np.array(
        [cy + dy * math.cos(angle) - dx * math.sin(angle), cx + dx * math.cos(angle) + dy * math.sin(angle)]
    )
    mark = _centroid(out_image > 140)
    assert np.abs(mark - expected).max() <= 1.0
    assert np.abs(_centroid(out_masks[1]) - mark).max() <= 1.0
    assert set(np.unique(out_masks).tolist()) == {0, 1}
    assert out_masks[[0, 2, 3]].sum() == 0


def test_rotation_fills_corners_by_reflection_not_black() -> None:
    image = np.full((H, W), 100, np.uint8)
    out_image, _ = apply_transform(image, np.zeros((4, H, W), np.uint8), "rot+10")
    assert (out_image == 100).all()


def test_rotation_keeps_classes_disjoint_and_binary() -> None:
    masks = np.zeros((4, H, W), np.uint8)
    masks[0, 22:42, 120:160] = 1
    masks[2, 22:42, 160:200] = 1  # touches class 1 along a column
    image = (masks.argmax(axis=0) * 60 + 30).astype(np.uint8)
    _, out = apply_transform(image, masks, "rot-10")
    assert out.max() == 1 and out.sum(axis=0).max() == 1
    assert abs(int(out[0].sum()) - int(masks[0].sum())) < 0.1 * masks[0].sum()


def test_rotation_of_packed_masks_matches_one_channel_at_a_time() -> None:
    """uint8 masks are rotated packed as bits of one channel; other dtypes channel by channel.
    Both must agree exactly, overlapping masks included."""
    rng = np.random.default_rng(0)
    masks = (rng.random((4, H, W)) < 0.3).astype(np.uint8)
    image = rng.integers(0, 255, (H, W), dtype=np.uint8)
    for name in ("rot+10", "rot-10"):
        packed = apply_transform(image, masks, name)
        separate = apply_transform(image, masks.astype(np.int64), name)
        assert packed[1].dtype == np.uint8 and separate[1].dtype == np.int64
        np.testing.assert_array_equal(packed[1], separate[1])
        np.testing.assert_array_equal(packed[0], separate[0])


def test_torch_in_torch_out_and_unknown_name() -> None:
    image, masks = _marked(20, 100)
    out_image, out_masks = apply_transform(torch.from_numpy(image), torch.from_numpy(masks), "rot+10")
    assert (
        isinstance(out_image, torch.Tensor) and out_image.dtype == torch.uint8 and out_image.shape == (H, W)
    )
    assert (
        isinstance(out_masks, torch.Tensor)
        and out_masks.dtype == torch.uint8
        and out_masks.shape == (4, H, W)
    )
    same = apply_transform(image, masks, None)
    assert same[0] is image and same[1] is masks
    with pytest.raises(ValueError, match="unknown transform 'rot90'"):
        apply_transform(image, masks, "rot90")
    with pytest.raises(ValueError, match=r"image \[H, W\] and masks \[C, H, W\]"):
        apply_transform(image, masks[:, :10], "hflip")


@pytest.fixture(scope="module")
def samples(synth_dir: Path, synth_cfg: DataConfig) -> list[Sample]:
    return load_samples(synth_dir, synth_cfg)


def test_balancing_raises_rare_classes_to_the_most_frequent(samples: list[Sample]) -> None:
    before = class_counts(samples, 4)
    plan = balance_plan(samples, 4, seed=0)
    after = class_counts(plan, 4)
    print(f"records per class before balancing {before.tolist()}, after {after.tolist()}")
    assert before.tolist() == [6, 3, 15, 5]
    assert (after >= 15).all() and after[1] >= 5 * before[1]
    # Every original once, untransformed, in input order; then transformed copies only.
    assert plan[: len(samples)] == [(s, None) for s in samples]
    copies = plan[len(samples) :]
    assert copies and all(name in TRANSFORMS for _, name in copies)
    # Only images holding a class that was short of the target are copied.
    assert all(set(s.labels) & {1, 2, 4} for s, _ in copies)
    # Repeated copies of one image cycle through the transforms instead of repeating one.
    by_image = Counter(s.image_id for s, _ in copies)
    busiest = by_image.most_common(1)[0][0]
    names = [name for s, name in copies if s.image_id == busiest]
    assert len(names) >= 4 and len(set(names[: len(TRANSFORMS)])) == min(len(names), len(TRANSFORMS))


def test_balancing_target_seed_and_no_op(samples: list[Sample]) -> None:
    plan = balance_plan(samples, 4, target=10, seed=1)
    after = class_counts(plan, 4)
    assert (after >= 10).all() and after[2] == 15 + sum(3 in s.labels for s, _ in plan[len(samples) :])
    assert balance_plan(samples, 4, target=10, seed=1) == plan
    assert balance_plan(samples, 4, target=10, seed=2) != plan
    assert balance_plan(samples, 4, target=2) == [(s, None) for s in samples]
    with pytest.raises(ValueError, match="balancing target must be >= 0"):
        balance_plan(samples, 4, target=-1)
