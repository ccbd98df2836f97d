"""Learning curves of a fold (thesis figures 66-69), drawn from its metrics.csv rows. Prediction overlays
(figures 70-74) are :mod:`engine.overlay`'s, the one drawing the server's console uses too."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training machine
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from engine.files import atomic_write


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss and Dice per epoch, train vs validation, side by side; written atomically as PNG."""
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
