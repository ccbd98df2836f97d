"""Pictures: learning curves (thesis figures 66-69) and prediction overlays (figures 70-74)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# BGR colours per class (cv2 order); cycled beyond four classes.
CLASS_COLOURS_BGR: tuple[tuple[int, int, int], ...] = (
    (0, 215, 255),  # 1 pits/dents: amber
    (255, 128, 0),  # 2 stains: blue
    (60, 60, 255),  # 3 scratches: red
    (80, 220, 60),  # 4 cracks/scabs: green
    (255, 0, 255),
    (255, 255, 0),
)


def class_colour(k: int) -> tuple[int, int, int]:
    """BGR colour of class index ``k`` (0-based)."""
    return CLASS_COLOURS_BGR[k % len(CLASS_COLOURS_BGR)]


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss and Dice per epoch, train vs validation, side by side; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((ax_loss, "loss", "loss"), (ax_dice, "dice", "Dice (thesis, soft)")):
        ax.plot(epochs, [float(r[f"train_{metric}"]) for r in rows], marker=".", label="train")
        ax.plot(epochs, [float(r[f"val_{metric}"]) for r in rows], marker=".", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if rows:
        best = min(rows, key=lambda r: float(r["val_loss"]))
        ax_loss.axvline(int(best["epoch"]), color="grey", linestyle="--", linewidth=1)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def overlay(
    image: np.ndarray,
    truth_masks: np.ndarray,
    predicted_masks: np.ndarray,
    present: Sequence[bool],
    class_names: Sequence[str],
    caption: str = "",
    alpha: float = 0.45,
) -> np.ndarray:
    """A BGR picture: the frame with predicted masks filled and ground truth outlined, per class colour.

    Top panel: ground-truth outlines on the frame; bottom: the same outlines over the filled
    predicted masks of the classes the model called present (an absent class's pixels are not
    drawn: the decision rule discards them). A legend line names the colours.
    """
    import cv2

    gray = np.asarray(image, dtype=np.uint8)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    top = base.copy()
    bottom = base.astype(np.float32)
    kernel = np.ones((3, 3), np.uint8)
    for k in range(truth_masks.shape[0]):
        colour = np.array(class_colour(k), dtype=np.float32)
        if present[k]:
            fill = predicted_masks[k].astype(bool)
            bottom[fill] = (1 - alpha) * bottom[fill] + alpha * colour
    bottom = bottom.round().astype(np.uint8)
    for k in range(truth_masks.shape[0]):
        mask = truth_masks[k].astype(np.uint8)
        if mask.any():
            outline = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, kernel).astype(bool)
            top[outline] = class_colour(k)
            bottom[outline] = class_colour(k)
    legend_height = 22
    legend = np.full((legend_height, gray.shape[1], 3), 255, np.uint8)
    x = 4
    cv2.putText(legend, caption, (x, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    x += 8 * len(caption) + 10
    for k, name in enumerate(class_names):
        cv2.rectangle(legend, (x, 5), (x + 12, 17), class_colour(k), -1)
        cv2.putText(legend, f"{k + 1} {name}", (x + 16, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
        x += 16 + 9 * (len(name) + 2) + 10
    separator = np.full((4, gray.shape[1], 3), 255, np.uint8)
    return np.concatenate([legend, top, separator, bottom], axis=0)


def write_overlay(path: Path, picture: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), picture):
        raise OSError(f"cannot write overlay image {path}")
