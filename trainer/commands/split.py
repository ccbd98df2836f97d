"""``trainer split``: the stratified holdout and K folds of data folders, as ``folds.csv`` (:mod:`trainer.splits`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli_util import CLIError
from trainer.splits import fold_class_counts, make_folds, parse_holdout, read_folds, write_folds

HELP = "make the stratified holdout and K folds of one or more data folders, write folds.csv"
DESCRIPTION = (
    "Splits the images of the data folders into a stratified holdout and K stratified folds "
    "(multi-label iterative stratification on each image's set of defect classes), writes "
    "folds.csv (ImageId,fold,labels; fold -1 = holdout) and prints the class counts per fold."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        metavar="DIR",
        help="data folder with train_images/ and train.csv (repeat for several)",
    )
    parser.add_argument("--folds", type=int, default=5, help="number of cross-validation folds (default 5)")
    parser.add_argument(
        "--holdout",
        type=parse_holdout,
        default=0.1,
        help="holdout size: a fraction (0.1) or an image count (250); default 0.1",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, help="folds file to write (default: FIRST_DIR/folds.csv)")
    parser.add_argument("--classes", type=int, default=4, help="number of defect classes (default 4)")
    parser.add_argument("--height", type=int, default=256, help="frame height in pixels (default 256)")
    parser.add_argument("--width", type=int, default=1600, help="frame width in pixels (default 1600)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing folds file that differs")


def run(args: argparse.Namespace) -> int:
    from trainer.data import DataConfig, load_samples

    cfg = DataConfig(num_classes=args.classes, height=args.height, width=args.width)
    samples = load_samples(args.data, cfg)
    if not samples:
        raise CLIError(f"no images found in {', '.join(str(d) for d in args.data)}")
    out = args.out if args.out is not None else args.data[0] / "folds.csv"
    assignment = make_folds(samples, cfg.num_classes, folds=args.folds, holdout=args.holdout, seed=args.seed)
    if out.exists() and not args.force and read_folds(out) != assignment:
        raise CLIError(f"{out} exists with a different split; pass --force to overwrite it")
    write_folds(out, assignment, samples)
    print(f"{len(samples)} images -> {out}")
    print(fold_class_counts(assignment, samples, cfg.num_classes).format(cfg.class_names))
    return 0
