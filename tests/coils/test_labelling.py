"""The compiled run-based labelling gives OpenCV's components, in OpenCV's order, with the same stats."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from coils import labelling
from coils.labelling import label
from coils.records import pack_mask

pytestmark = pytest.mark.skipif(labelling.labelling_kernel is None, reason="numba is not installed: OpenCV labels")


def assert_same(grid: np.ndarray, owned: np.ndarray, probs: np.ndarray | None) -> None:
    compiled, opencv = label(grid, owned, probs), label(grid, owned, probs, compiled=False)
    np.testing.assert_array_equal(compiled.stats, opencv.stats)
    if probs is None:
        assert compiled.peaks is None and opencv.peaks is None
    else:
        np.testing.assert_array_equal(compiled.peaks, opencv.peaks)
    assert len(compiled.crops) == len(opencv.crops) == len(compiled.packed)
    for mine, theirs, packed in zip(compiled.crops, opencv.crops, compiled.packed):
        assert mine.dtype == theirs.dtype == bool
        np.testing.assert_array_equal(mine, theirs)
        assert packed == pack_mask(theirs)


@st.composite
def masks(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 70))
    grid = draw(arrays(np.bool_, (rows, cols)))
    owned = draw(arrays(np.bool_, (cols,)))
    probs = draw(st.none() | arrays(np.float32, (rows, cols), elements=st.floats(0, 1, width=32)))
    if draw(st.booleans()):  # a frame whose along axis is x: labelled through its transpose
        grid, probs = grid.T, None if probs is None else probs.T
        owned = draw(arrays(np.bool_, (grid.shape[1],)))
    return grid, owned, probs


@settings(max_examples=400, deadline=None)
@given(masks())
def test_components_equal_opencvs_on_random_masks(case: tuple[np.ndarray, np.ndarray, np.ndarray | None]) -> None:
    assert_same(*case)


@pytest.mark.parametrize("density", [0.02, 0.3, 0.6, 0.95])
def test_components_equal_opencvs_on_frame_sized_masks(density: float) -> None:
    rng = np.random.default_rng(int(density * 100))
    noise = cv2.GaussianBlur(rng.random((256, 1600)).astype(np.float32), (0, 0), 3)  # blobs, not salt
    grid = noise > np.quantile(noise, 1 - density)
    owned = np.arange(1600) < 1200
    assert_same(grid, owned, rng.random((256, 1600)).astype(np.float32))
    assert_same(grid.view(np.uint8) * np.uint8(255), owned, None)  # 0/255 masks: any nonzero is set


def test_components_equal_opencvs_with_more_runs_than_the_first_scan_has_room_for() -> None:
    grid = np.random.default_rng(7).random((256, 1600)) < 0.5  # salt: about 100,000 runs
    assert_same(grid, np.ones(1600, bool), None)


def test_components_are_numbered_by_their_first_2x2_block() -> None:
    """OpenCV's order, not the pixels' raster order: B's first pixel comes first, A's block does."""
    grid = np.zeros((4, 6), np.uint8)
    grid[0, 3] = 1  # B: block (0, 1)
    grid[1, 0] = 1  # A: block (0, 0)
    found = label(grid, np.ones(6, bool))
    assert found.stats[:, :2].tolist() == [[1, 0], [0, 3]]
    assert_same(grid, np.ones(6, bool), None)


def test_an_empty_mask_has_no_components() -> None:
    found = label(np.zeros((8, 16), bool), np.ones(16, bool))
    assert found.stats.shape == (0, 6) and found.crops == []
