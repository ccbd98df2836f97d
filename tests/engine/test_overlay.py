"""engine.overlay: the one drawing of a prediction (evaluation renders and the console)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.overlay import (
    FILL_ALPHA,
    TRUTH_GREY_BGR,
    class_colour,
    class_colour_hex,
    draw_prediction,
    render_evaluation,
    verdicts,
)

NAMES = ["pits/dents", "stains", "scratches", "cracks/scabs"]
H, W = 64, 320


@pytest.fixture()
def scene():
    """A flat grey frame with one class-3 scratch (rows 20-29, columns 100-199) and 150 stray class-2 pixels."""
    frame = np.full((H, W), 90, np.uint8)
    truth = np.zeros((4, H, W), np.uint8)
    truth[2, 20:30, 100:200] = 1
    stray = np.zeros((H, W), np.uint8)
    stray[40:50, 10:25] = 1
    return frame, truth, stray


def prediction_panel(rendering, height: int = H) -> np.ndarray:
    """The prediction panel inside an evaluation picture: below the truth panel and both headers."""
    top = 16 + height + 16
    return rendering.image[top:top + height, :W]


def test_empty_and_matching_predictions_differ_and_say_so(scene) -> None:
    frame, truth, _ = scene
    empty = render_evaluation(frame, truth, np.zeros_like(truth), [0, 0, 0, 0], [False] * 4, NAMES,
                              min_areas=[200] * 4, title="empty.jpg")
    matched = render_evaluation(frame, truth, truth.copy(), [0, 0, 1000, 0], [False, False, True, False], NAMES,
                                min_areas=[200] * 4, title="matched.jpg")
    empty_panel, matched_panel = prediction_panel(empty), prediction_panel(matched)
    inside = (slice(22, 28), slice(102, 198))  # the scratch, away from its outline

    # Empty prediction: the scratch's inside is the bare frame; only a dashed grey truth outline is drawn.
    assert (empty_panel[inside] == 90).all()
    drawn = (empty_panel != 90).any(axis=2)
    assert drawn.any()
    assert (empty_panel[drawn] == TRUTH_GREY_BGR).all()
    boundary = truth[2].astype(bool) & ~np.pad(truth[2], 1)[2:, 1:-1].astype(bool)  # the scratch's bottom row
    assert 0 < drawn[boundary].sum() < boundary.sum()  # dashed: some of the outline, not all of it

    # Matching prediction: the scratch filled in class 3's colour.
    expected = np.round((1 - FILL_ALPHA) * 90 + FILL_ALPHA * np.array(class_colour(2), np.float32))
    assert (matched_panel[inside] == expected.astype(np.uint8)).all()
    assert (matched_panel != empty_panel).any(axis=2).sum() > 90 * 8

    assert empty.classes[2].predicted == 0 and not empty.classes[2].present and empty.classes[2].truth == 1000
    assert empty.classes[2].outcome == "FN" and matched.classes[2].outcome == "TP"
    assert [v.outcome for v in matched.classes] == ["TN", "TN", "TP", "TN"]
    assert empty.outcome_tag == "FN3" and matched.outcome_tag == "TP3"
    assert empty.caption[0] == "empty.jpg  [FN3]"
    assert empty.caption[3] == "3 scratches: predicted 0 px (min 200) absent; truth 1000 px; FN"
    assert matched.caption[3] == "3 scratches: predicted 1000 px (min 200) present; truth 1000 px; TP"
    # The truth panel is the same in both.
    assert (empty.image[16:16 + H, :W] == matched.image[16:16 + H, :W]).all()


def test_discarded_pixels_are_hatched_and_listed(scene) -> None:
    frame, truth, stray = scene
    masks = truth.copy()
    masks[1] = stray
    rendering = render_evaluation(frame, truth, masks, [0, 150, 1000, 0], [False, False, True, False], NAMES,
                                  min_areas=[200, 200, 200, 200])
    stains = rendering.classes[1]
    assert stains.discarded and not stains.present and stains.outcome == "TN"
    assert rendering.caption[2] == "2 stains: predicted 150 px (min 200) absent, discarded; truth 0 px; TN"
    region = prediction_panel(rendering)[40:50, 10:25]
    coloured = (region == class_colour(1)).all(axis=2)
    # Stripes of the class colour over bare frame, not a fill: some pixels coloured, the rest untouched.
    assert 0.1 < coloured.mean() < 0.5
    assert (region[~coloured] == 90).all()


def test_display_variant_draws_at_display_size(scene) -> None:
    frame, truth, _ = scene
    small = draw_prediction(frame, truth, [False, False, True, False], size=(32, 160))
    assert small.shape == (32, 160, 3)
    assert (small[12, 55] != 90).any() and (small[2, 5] == 90).all()  # inside the scratch at half size; outside
    assert draw_prediction(frame, truth, [False, False, True, False]).shape == (H, W, 3)


def test_verdicts_check_lengths_and_colours_are_html() -> None:
    with pytest.raises(ValueError, match="present"):
        verdicts([1, 2], [True], NAMES)
    assert class_colour_hex(2) == "#ff3c3c"
