"""RLE: round trips, the Kaggle convention, every kind of bad input, and pycocotools as an outside check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as coco_mask

from engine import rle


def masks_2d(max_side: int = 40):
    shapes = st.tuples(st.integers(1, max_side), st.integers(1, max_side))
    return shapes.flatmap(lambda s: arrays(np.uint8, s, elements=st.integers(0, 1)))


@settings(max_examples=200, deadline=None)
@given(masks_2d())
def test_round_trip_random_masks(mask):
    text = rle.encode(mask)
    assert np.array_equal(rle.decode(text, *mask.shape), mask)


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 12), st.integers(1, 12)),
              elements=st.integers(0, 1)))
def test_encode_batch_equals_per_mask_encode(masks):
    batch = rle.encode_batch(masks)
    assert [[rle.encode(m) for m in image] for image in masks] == batch


def test_kaggle_convention_is_column_major_and_one_based():
    mask = np.zeros((3, 4), np.uint8)
    mask[0, 0] = 1  # pixel 1
    mask[1:3, 0] = 1  # pixels 2-3: same column, contiguous with pixel 1
    mask[0, 1] = 1  # pixel 4: top of the next column continues the run
    mask[2, 3] = 1  # pixel 12: last pixel
    assert rle.encode(mask) == "1 4 12 1"
    assert np.array_equal(rle.decode("1 4 12 1", 3, 4), mask)


def test_empty_and_full_masks():
    assert rle.encode(np.zeros((256, 1600), np.uint8)) == ""
    assert rle.decode("", 2, 3).sum() == 0
    assert rle.decode(None, 2, 3).sum() == 0
    assert rle.decode(float("nan"), 2, 3).shape == (2, 3)
    assert rle.encode(np.ones((2, 3), np.uint8)) == "1 6"
    assert rle.decode("1 6", 2, 3).dtype == np.uint8


def test_nonzero_values_of_any_dtype_are_foreground():
    mask = np.array([[0, 7], [True, 0]], dtype=np.int32)
    assert rle.encode(mask) == "2 2"
    assert rle.encode(mask.astype(bool)) == "2 2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2 3", "odd number of tokens"),
        ("1 x", "'x' is not an integer"),
        ("1.5 2", "'1.5' is not an integer"),
        ("0 5", "start 0 is below 1"),
        ("-3 5", "start -3 is below 1"),
        ("3 0", "has length 0"),
        ("12 2", "past the 3x4 mask"),
        ("5 2 1 2", "unsorted or overlapping"),
        ("1 3 2 2", "unsorted or overlapping"),
    ],
)
def test_bad_rle_is_rejected_with_its_own_message(text, message):
    with pytest.raises(ValueError, match=message):
        rle.decode(text, 3, 4)


def test_adjacent_runs_are_valid():
    assert rle.decode("1 2 3 2", 2, 2).sum() == 4


def test_encode_rejects_wrong_rank():
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        rle.encode_batch(np.zeros((2, 2, 2)))


def kaggle_to_coco_counts(text: str, height: int, width: int) -> list[int]:
    """Kaggle 'start length' pairs -> COCO uncompressed counts (alternating zeros/ones, column-major)."""
    values = [int(v) for v in text.split()]
    counts, position = [], 0
    for start, length in zip(values[0::2], values[1::2]):
        counts += [start - 1 - position, length]
        position = start - 1 + length
    if position < height * width:  # COCO leaves out a trailing run of zero length
        counts.append(height * width - position)
    return counts


@settings(max_examples=100, deadline=None)
@given(masks_2d(30))
def test_agrees_with_pycocotools(mask):
    height, width = mask.shape
    ours = rle.encode(mask)
    theirs = coco_mask.encode(np.asfortranarray(mask))
    from_ours = coco_mask.frPyObjects({"size": [height, width], "counts": kaggle_to_coco_counts(ours, height, width)},
                                      height, width)
    assert from_ours["counts"] == theirs["counts"]
    assert np.array_equal(coco_mask.decode(theirs), rle.decode(ours, height, width))
