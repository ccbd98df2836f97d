"""The one way the product draws a prediction: ``trainer evaluate --render`` and the server's console.

A prediction panel shows only the prediction: the masks of present classes filled in their class
colour with a solid outline of that colour; the pixels of a class the minimum-area rule discarded
(some pixels over the threshold, fewer than its minimum area) hatched in its colour, never filled;
the ground truth, when given, as a thin dashed grey outline, so it cannot be mistaken for the
model's answer. Every drawing comes with the per-class facts it shows (:class:`ClassVerdict`):
predicted pixel count, present or absent against the minimum area, discarded or not, the truth's
pixel count and the outcome (TP / FP / FN / TN) when the truth is known.

numpy and OpenCV only: the server draws with it and runs without torch or matplotlib.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np

# BGR colours per class (cv2 order); cycled beyond six classes.
CLASS_COLOURS_BGR: tuple[tuple[int, int, int], ...] = (
    (0, 215, 255),  # 1 pits/dents: amber
    (255, 128, 0),  # 2 stains: blue
    (60, 60, 255),  # 3 scratches: red
    (80, 220, 60),  # 4 cracks/scabs: green
    (255, 0, 255),
    (255, 255, 0),
)
TRUTH_GREY_BGR = (200, 200, 200)
FILL_ALPHA = 0.45
OUTCOMES = ("TP", "FP", "FN", "TN")
_DASH = 6  # truth outline: 6 contour pixels drawn, 6 skipped
_HATCH_PERIOD, _HATCH_WIDTH = 8, 2  # discarded pixels: diagonal stripes 2 px wide every 8 px
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_LINE = 16  # caption line height, pixels


def class_colour(k: int) -> tuple[int, int, int]:
    """BGR colour of class index ``k`` (0-based)."""
    return CLASS_COLOURS_BGR[k % len(CLASS_COLOURS_BGR)]


def class_colour_hex(k: int) -> str:
    """``#rrggbb`` of class index ``k`` (0-based), for HTML legends."""
    b, g, r = class_colour(k)
    return f"#{r:02x}{g:02x}{b:02x}"


@dataclass(frozen=True)
class ClassVerdict:
    """What a drawing shows about one class of one frame.

    Attributes:
        class_id: 1-based class id.
        name: the class's name.
        predicted: pixels over the class's threshold (exact count at the frame's resolution).
        min_area: the class's minimum area (None when unknown, e.g. a predictions CSV).
        present: the model's decision: ``predicted >= min_area``.
        discarded: pixels were predicted but the minimum-area rule made the class absent.
        truth: the ground truth's pixel count, None when no truth was given.
        outcome: TP / FP / FN / TN against the truth (present vs truth > 0), None without truth.
    """

    class_id: int
    name: str
    predicted: int
    min_area: int | None
    present: bool
    discarded: bool
    truth: int | None = None
    outcome: str | None = None

    def caption(self) -> str:
        rule = "" if self.min_area is None else f" (min {self.min_area})"
        decision = "present" if self.present else ("absent, discarded" if self.discarded else "absent")
        text = f"{self.class_id} {self.name}: predicted {self.predicted} px{rule} {decision}"
        if self.truth is not None:
            text += f"; truth {self.truth} px; {self.outcome}"
        return text


@dataclass(frozen=True)
class Rendering:
    """A drawing and what it shows.

    Attributes:
        image: BGR uint8 picture.
        classes: one :class:`ClassVerdict` per class.
        caption: the picture's caption lines (title first, then one per class), as drawn.
    """

    image: np.ndarray
    classes: tuple[ClassVerdict, ...]
    caption: tuple[str, ...]

    @property
    def outcome_tag(self) -> str:
        """Outcomes other than TN, e.g. ``TP4-FN3`` (``TN`` when every class is a true negative;
        empty without truth): what a file name carries."""
        if any(v.outcome is None for v in self.classes):
            return ""
        tags = [f"{v.outcome}{v.class_id}" for v in self.classes if v.outcome != "TN"]
        return "-".join(tags) or "TN"

    def to_dict(self) -> dict:
        return {"classes": [asdict(v) for v in self.classes], "caption": list(self.caption),
                "outcome_tag": self.outcome_tag}


def outcome(present: bool, truth_pixels: int) -> str:
    """TP / FP / FN / TN of one (frame, class) pair: the decision against the truth having pixels."""
    return OUTCOMES[(0 if truth_pixels > 0 else 1) if present else (2 if truth_pixels > 0 else 3)]


def verdicts(
    counts: Sequence[int],
    present: Sequence[bool],
    class_names: Sequence[str],
    min_areas: Sequence[int] | None = None,
    truth_counts: Sequence[int] | None = None,
) -> tuple[ClassVerdict, ...]:
    """One :class:`ClassVerdict` per class from a frame's counts and decisions (and truth counts).

    Raises:
        ValueError: the per-class sequences disagree in length.
    """
    c = len(counts)
    lengths = {"present": len(present), "min_areas": c if min_areas is None else len(min_areas),
               "truth_counts": c if truth_counts is None else len(truth_counts)}
    wrong = {name: n for name, n in lengths.items() if n != c}
    if wrong:
        raise ValueError(f"{c} classes in counts but {wrong}")
    out = []
    for k in range(c):
        predicted, is_present = int(counts[k]), bool(present[k])
        truth = None if truth_counts is None else int(truth_counts[k])
        name = class_names[k] if k < len(class_names) else f"class {k + 1}"
        out.append(ClassVerdict(
            class_id=k + 1, name=name, predicted=predicted,
            min_area=None if min_areas is None else int(min_areas[k]), present=is_present,
            discarded=predicted > 0 and not is_present, truth=truth,
            outcome=None if truth is None else outcome(is_present, truth),
        ))
    return tuple(out)


def _resized(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    mask = np.asarray(mask, dtype=np.uint8)
    if mask.shape == (h, w):
        return mask.astype(bool)
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def _palette(num_classes: int) -> np.ndarray:
    """An OpenCV lookup table ``[256, 1, 3]``: label 0 black, label k + 1 class k's BGR colour."""
    table = np.zeros((256, 1, 3), np.uint8)
    for k in range(min(num_classes, 255)):
        table[k + 1, 0] = class_colour(k)
    return table


def _coloured(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """A label image in its classes' colours (cv2.LUT: several times faster than numpy indexing)."""
    return cv2.LUT(cv2.cvtColor(labels, cv2.COLOR_GRAY2BGR), palette)


@functools.lru_cache(maxsize=8)
def _hatch(h: int, w: int) -> np.ndarray:
    """Diagonal stripes over an ``h`` x ``w`` picture (read-only, cached: the console draws one size)."""
    rows, cols = np.indices((h, w), sparse=True)
    stripes = (rows + cols) % _HATCH_PERIOD < _HATCH_WIDTH
    stripes.setflags(write=False)
    return stripes


def _outline(mask: np.ndarray) -> np.ndarray:
    """The inner boundary pixels of a boolean mask."""
    eroded = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT,
                       borderValue=0)
    return mask & ~eroded.astype(bool)


def _dashed_outline(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a dashed outline of a boolean mask (every other run of ``_DASH`` contour pixels)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    points = np.concatenate([c.reshape(-1, 2) for c in contours])
    keep = (np.arange(len(points)) // _DASH) % 2 == 0
    return points[keep, 1], points[keep, 0]


def draw_prediction(
    frame: np.ndarray,
    masks: np.ndarray,
    present: Sequence[bool],
    truth_masks: np.ndarray | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The prediction panel: a BGR picture of ``frame`` with only the prediction drawn over it.

    Args:
        frame: uint8 ``[H, W]`` grayscale frame.
        masks: 0/1 ``[C, H, W]``: every pixel over its class's threshold, present or not.
        present: per class, the model's decision.
        truth_masks: optional 0/1 ``[C, H, W]`` ground truth, drawn as a thin dashed grey outline.
        size: ``(height, width)`` to draw at (the console's smaller display variant); the frame's own
            size when None.
    """
    gray = np.asarray(frame, dtype=np.uint8)
    if size is not None and tuple(size) != gray.shape:
        gray = cv2.resize(gray, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    h, w = gray.shape
    panel = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    palette = _palette(masks.shape[0])
    fill = np.zeros((h, w), np.uint8)  # 1 + class index of the filled (present) pixels, 0 elsewhere
    marks = np.zeros((h, w), np.uint8)  # the same for solid-colour pixels: outlines and hatching
    for k in range(masks.shape[0]):
        mask = _resized(masks[k], (h, w))
        if not mask.any():
            continue
        if present[k]:
            np.copyto(fill, k + 1, where=mask)
            np.copyto(marks, k + 1, where=_outline(mask))
        else:  # discarded by the minimum-area rule: hatched, never filled
            np.copyto(marks, k + 1, where=mask & _hatch(h, w))
    # Label images and one palette lookup each: a few passes over the picture whatever the classes.
    # (cv2.copyTo: numpy's copyto with a broadcast mask is a hundred times slower.)
    if fill.any():
        blended = cv2.addWeighted(panel, 1 - FILL_ALPHA, _coloured(fill, palette), FILL_ALPHA, 0)
        panel = cv2.copyTo(blended, fill, panel)
    if marks.any():
        panel = cv2.copyTo(_coloured(marks, palette), marks, panel)
    if truth_masks is not None:
        for k in range(truth_masks.shape[0]):
            ys, xs = _dashed_outline(_resized(truth_masks[k], (h, w)))
            panel[ys, xs] = TRUTH_GREY_BGR
    return panel


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    """A panel with a one-line white header naming what it shows."""
    header = np.full((_LINE, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(header, text, (4, _LINE - 4), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, panel], axis=0)


def _caption_block(lines: Sequence[str], classes: Sequence[ClassVerdict], width: int) -> np.ndarray:
    """White caption strip: the title, then one line per class with its colour swatch."""
    block = np.full((_LINE * len(lines) + 4, width, 3), 255, np.uint8)
    for i, text in enumerate(lines):
        y = _LINE * (i + 1) - 3
        x = 4
        if i > 0:
            k = classes[i - 1].class_id - 1
            cv2.rectangle(block, (4, y - 10), (14, y), class_colour(k), -1)
            x = 20
        cv2.putText(block, text, (x, y), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return block


def _pad_width(picture: np.ndarray, width: int) -> np.ndarray:
    if picture.shape[1] >= width:
        return picture
    pad = np.full((picture.shape[0], width - picture.shape[1], 3), 255, np.uint8)
    return np.concatenate([picture, pad], axis=1)


def render_evaluation(
    frame: np.ndarray,
    truth_masks: np.ndarray,
    masks: np.ndarray,
    counts: Sequence[int],
    present: Sequence[bool],
    class_names: Sequence[str],
    min_areas: Sequence[int] | None = None,
    title: str = "",
) -> Rendering:
    """Truth panel over prediction panel, with a caption per class (``trainer evaluate --render``).

    The truth panel outlines the ground truth in class colours; the prediction panel is
    :func:`draw_prediction` with the truth as a dashed grey outline; the caption gives each class's
    predicted pixels, its decision against the minimum area, the truth's pixels and the outcome.
    """
    gray = np.asarray(frame, dtype=np.uint8)
    truth_counts = [int(np.count_nonzero(m)) for m in truth_masks]
    classes = verdicts(counts, present, class_names, min_areas, truth_counts)
    truth_panel = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    for k in range(truth_masks.shape[0]):
        truth_panel[_outline(truth_masks[k].astype(bool))] = class_colour(k)
    prediction = draw_prediction(gray, masks, present, truth_masks)
    tag = Rendering(gray, classes, ()).outcome_tag
    lines = (f"{title}  [{tag}]".strip(),) + tuple(v.caption() for v in classes)
    width = max([gray.shape[1]] + [cv2.getTextSize(t, _FONT, 0.4, 1)[0][0] + 24 for t in lines])
    parts = [
        _label(truth_panel, "TRUTH (class-colour outlines)"),
        _label(prediction, "PREDICTION (filled: present, hatched: discarded < min area, dashed grey: truth)"),
        _caption_block(lines, classes, width),
    ]
    image = np.concatenate([_pad_width(p, width) for p in parts], axis=0)
    return Rendering(image=image, classes=classes, caption=lines)


def write_png(path: str, image: np.ndarray) -> None:
    """Writes a BGR picture as PNG (smallest file: renders are few and kept); raises OSError when OpenCV cannot."""
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"cannot write image {path}")


__all__ = [
    "CLASS_COLOURS_BGR", "ClassVerdict", "Rendering", "class_colour", "class_colour_hex", "draw_prediction",
    "outcome", "render_evaluation", "verdicts", "write_png",
]
