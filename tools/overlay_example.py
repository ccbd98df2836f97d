"""The overlay picture of docs/training.md: ``engine.overlay.render_evaluation`` on a ``trainer synth`` frame.

No trained model is involved: the "prediction" is made from the frame's own truth so that one
picture shows every element of the drawing: a class found (filled, TP), a class whose few
predicted pixels the minimum-area rule discarded (hatched, FN), and the truth as a dashed grey
outline. ``make demo`` writes the real model's renders to ``demo/run/renders/``.

    .venv/bin/python tools/overlay_example.py --out docs/overlay-example.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from engine.metadata import DEFAULT_CLASS_NAMES
from engine.overlay import render_evaluation, write_png
from trainer.data import DataConfig, load_samples, read_image, sample_masks
from trainer.synth import synthesize

MIN_AREA = 200  # the thesis' rule at its 128x800 resolution (a small picture for docs/training.md)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/overlay-example.png"))
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    cfg = DataConfig(num_classes=4, height=128, width=800)
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthesize(Path(tmp) / "data", 40, cfg.height, cfg.width, seed=args.seed)
        samples = load_samples(folder, cfg)
        two = [s for s in samples if sum(bool(r) for r in s.rles) >= 2]
        if not two:
            raise SystemExit(f"no synthetic frame with two defect classes for seed {args.seed}; try another --seed")
        sample = two[0]
        frame = read_image(sample.path, cfg)
        truth = sample_masks(sample, cfg)
    found, missed = [k for k in range(4) if truth[k].any()][:2]
    masks = np.zeros_like(truth)
    masks[found] = cv2.dilate(truth[found], np.ones((5, 5), np.uint8))  # found, a little wider than the truth
    ys, xs = np.nonzero(truth[missed])
    keep = ys < np.sort(ys)[min(len(ys), MIN_AREA // 2) - 1]  # its top end only: under the minimum area
    masks[missed][ys[keep], xs[keep]] = 1
    counts = [int(m.sum()) for m in masks]
    present = [c >= MIN_AREA for c in counts]
    rendering = render_evaluation(frame, truth, masks, counts, present, DEFAULT_CLASS_NAMES, [MIN_AREA] * 4,
                                  title=f"{sample.image_id} (trainer synth; prediction made from the truth)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_png(str(args.out), rendering.image)
    print(f"wrote {args.out}: {rendering.outcome_tag}")
    for line in rendering.caption:
        print(" ", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
