"""``trainer synth``: a synthetic Severstal-format data set of a steel strip line (:mod:`trainer.synth`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from engine import rle
from trainer.samples import ANNOTATIONS_FILE

HELP = "write a synthetic Severstal-format data set (train_images/ + train.csv) of a steel strip line"
DESCRIPTION = (
    "Draws N frames of rolled steel with four kinds of defects (pits/dents, stains, scratches, "
    "cracks/scabs) and writes DIR/train_images/*.jpg, DIR/train.csv (ImageId,ClassId,EncodedPixels) "
    "and DIR/synth.json. Deterministic by seed."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="data folder to write")
    parser.add_argument("--images", type=int, default=200, help="number of frames (default 200)")
    parser.add_argument("--height", type=int, default=256, help="frame height (default 256)")
    parser.add_argument("--width", type=int, default=1600, help="frame width (default 1600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--classes", type=int, default=4, help="defect classes to draw, 1..4 (default 4)")
    parser.add_argument("--force", action="store_true", help="replace an earlier data set in DIR")


def run(args: argparse.Namespace) -> int:
    from trainer.synth import KINDS, synthesize

    start = time.perf_counter()
    out = synthesize(
        args.out, args.images, args.height, args.width, args.seed, args.classes, overwrite=args.force
    )
    seconds = time.perf_counter() - start
    counts = np.zeros(args.classes, dtype=np.int64)
    areas: list[list[int]] = [[] for _ in range(args.classes)]
    with open(out / ANNOTATIONS_FILE, encoding="utf-8") as f:
        next(f)
        for line in f:
            _, k, encoded = line.rstrip("\n").split(",")
            counts[int(k) - 1] += 1
            areas[int(k) - 1].append(int(rle.decode(encoded, args.height, args.width).sum()))
    pairs = args.images * args.classes
    print(f"wrote {args.images} frames of {args.height}x{args.width} to {out} in {seconds:.1f} s")
    for k in range(args.classes):
        median = int(np.median(areas[k])) if areas[k] else 0
        print(f"  class {k + 1} {KINDS[k]:<13} images {counts[k]:>5}  median area {median} px")
    print(f"  empty (image, class) pairs: {1 - counts.sum() / pairs:.1%}")
    return 0
