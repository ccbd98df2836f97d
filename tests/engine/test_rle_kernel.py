"""The compiled RLE kernel makes exactly the numpy encoder's strings, for every kind of mask."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine import rle

pytest.importorskip("numba", reason="the RLE kernel needs numba (the cpu extra)")


def assert_same(masks: np.ndarray) -> list[list[str]]:
    """The kernel's strings, checked equal to the numpy encoder's and to per-mask :func:`rle.encode`."""
    encoded = rle.encode_batch(masks)
    assert encoded == rle.encode_batch_numpy(masks)
    assert encoded == [[rle.encode(m) for m in image] for image in masks]
    return encoded


def test_the_kernel_is_the_one_running():
    assert rle._kernel() is not None


@settings(max_examples=300, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 23), st.integers(1, 37)),
              elements=st.integers(0, 1)))
def test_random_masks_of_odd_sizes(masks):
    assert_same(masks)


@pytest.mark.parametrize("density", [0.01, 0.5, 0.99])
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 2, 64, 16), (1, 1, 1, 1), (1, 1, 1, 17), (3, 1, 13, 1)])
def test_random_densities(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    assert_same((rng.random(shape) < density).astype(np.uint8))


@pytest.mark.parametrize("shape", [(5, 3), (8, 8), (256, 1600), (3, 17)])
def test_empty_full_and_single_pixels_at_both_ends(shape):
    h, w = shape
    empty, full = np.zeros(shape, np.uint8), np.ones(shape, np.uint8)
    first, last = empty.copy(), empty.copy()
    first[0, 0] = 1
    last[-1, -1] = 1
    batch = np.stack([empty, full, first, last])[:, None]
    assert assert_same(batch) == [[""], [f"1 {h * w}"], ["1 1"], [f"{h * w} 1"]]


def test_runs_cross_column_boundaries_in_every_word_position():
    # A run from the bottom of column j to the top of column j + 1 is one run, whichever of the
    # kernel's eight-column words the two columns fall in (j = 7 crosses from one word to the next).
    h, w = 4, 20
    for j in range(w - 1):
        mask = np.zeros((h, w), np.uint8)
        mask[2:, j] = 1
        mask[:3, j + 1] = 1
        assert assert_same(mask[None, None]) == [[f"{j * h + 3} 5"]]


def test_a_run_ending_on_the_last_pixel_and_one_on_the_first_of_a_padded_word():
    mask = np.zeros((3, 9), np.uint8)
    mask[:, 7:] = 1  # columns 7 and 8: the second straddles the kernel's padded last word
    mask[0, 0] = 1
    assert assert_same(mask[None, None]) == [["1 1 22 6"]]


def test_a_batch_with_mixed_empty_classes():
    rng = np.random.default_rng(3)
    masks = (rng.random((4, 4, 32, 48)) < 0.3).astype(np.uint8)
    masks[0] = 0
    masks[1, 2] = 0
    masks[3, ::2] = 0
    encoded = assert_same(masks)
    assert encoded[0] == [""] * 4 and encoded[1][2] == "" and encoded[3][0] == encoded[3][2] == ""
    assert all(encoded[2])


def test_any_dtype_and_layout_non_zero_is_foreground():
    rng = np.random.default_rng(4)
    values = rng.integers(0, 3, size=(2, 2, 11, 24)) * rng.integers(0, 120, size=(2, 2, 11, 24))  # < 256: exact in uint8
    reference = rle.encode_batch_numpy(values != 0)
    for masks in (values.astype(np.uint8), values.astype(np.int32), values.astype(np.float32), values != 0,
                  np.asfortranarray(values.astype(np.uint8)), np.concatenate([values, values], axis=3)[..., ::2]):
        assert rle.encode_batch(masks) == rle.encode_batch_numpy(masks)
    assert rle.encode_batch(values.astype(np.uint8)) == reference


def test_a_text_larger_than_the_first_buffer_grows_it():
    masks = np.zeros((2, 1, 256, 1600), np.uint8)
    masks[:, :, ::2] = 1  # every other pixel: 204,800 runs per mask, megabytes of text
    encoded = assert_same(masks)
    assert len(encoded[0][0]) > 1 << 20 and encoded[0][0] == encoded[1][0]


def test_line_like_blobs_at_full_frame_size():
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:256, :1600]
    masks = np.zeros((2, 4, 256, 1600), np.uint8)
    for plane in masks.reshape(-1, 256, 1600)[:7]:
        for _ in range(5):
            cy, cx, ry, rx = rng.uniform(0, 256), rng.uniform(0, 1600), rng.uniform(5, 60), rng.uniform(5, 90)
            plane[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = 1
    encoded = assert_same(masks)
    assert sum(map(bool, encoded[0] + encoded[1])) == 7


def test_masks_of_a_wrong_rank_are_refused():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        rle.encode_batch(np.zeros((3, 4, 5), np.uint8))


def test_without_numba_the_numpy_encoder_answers(tmp_path):
    # A fresh interpreter where importing numba fails, as on an install without the cpu extra.
    script = tmp_path / "no_numba.py"
    script.write_text(
        "import sys\n"
        "sys.modules['numba'] = None\n"
        "import numpy as np\n"
        "from engine import rle\n"
        "masks = np.zeros((1, 2, 3, 4), np.uint8)\n"
        "masks[0, 1, 1:, 1] = 1\n"
        "assert rle._kernel() is None\n"
        "print(rle.encode_batch(masks))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[['', '5 2']]"
