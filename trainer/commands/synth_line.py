"""``trainer synth-line``: coils as a line's cameras see them, with the truth in coil coordinates
(:mod:`trainer.synth_line`)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write synthetic coils as several cameras across a strip see them, with line.yaml and the truth"
DESCRIPTION = (
    "Writes DIR/line.yaml (the cameras' lanes, overlapping by --overlap-px, and a roll), one folder of "
    "frames per camera, DIR/frames.csv (camera_id,frame_id,coil_id,position_mm,file), the true masks "
    "(DIR/masks.csv) and the planted defects in coil coordinates (DIR/truth.csv, DIR/truth.json): defects "
    "over frame boundaries, over two lanes, both, a long scratch, roll marks at the roll's period and "
    "plain ones. Stream it with 'server client --line DIR'. Deterministic by seed."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trainer.synth_line import IMAGE_FORMATS, LineSpec

    spec = LineSpec()
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="line folder to write")
    parser.add_argument("--cameras", type=int, default=spec.cameras, help="cameras across the strip (default %(default)s)")
    parser.add_argument("--frames", type=int, default=spec.frames, help="frames per camera per coil (default %(default)s)")
    parser.add_argument("--coils", type=int, default=spec.coils, help="coils (default %(default)s)")
    parser.add_argument("--height", type=int, default=spec.height, help="frame pixels along the strip (default %(default)s)")
    parser.add_argument("--width", type=int, default=spec.width, help="frame pixels across (default %(default)s)")
    parser.add_argument("--overlap-px", type=int, default=spec.overlap_px,
                        help="pixels neighbouring lanes share (default %(default)s)")
    parser.add_argument("--mm-per-px", type=float, default=spec.mm_per_px, help="pixel size (default %(default)s)")
    parser.add_argument("--roll-diameter-mm", type=float, default=None,
                        help="diameter of the roll printing marks (default: a period of 3.7 frames)")
    parser.add_argument("--format", default=spec.image_format, choices=IMAGE_FORMATS, help="image files (default jpg)")
    parser.add_argument("--seed", type=int, default=spec.seed, help="random seed (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an earlier line folder in DIR")


def run(args: argparse.Namespace) -> int:
    from collections import Counter

    from coils.line_folder import read_truth
    from trainer.synth_line import LineSpec, synthesize_line

    spec = LineSpec(cameras=args.cameras, frames=args.frames, coils=args.coils, height=args.height, width=args.width,
                    overlap_px=args.overlap_px, mm_per_px=args.mm_per_px, roll_diameter_mm=args.roll_diameter_mm,
                    seed=args.seed, image_format=args.format)
    facts = synthesize_line(args.out, spec, overwrite=args.force)
    kinds = Counter(defect.kind for defect in read_truth(args.out))
    print(f"wrote {spec.coils} coil(s) x {spec.cameras} camera(s) x {spec.frames} frames of {spec.height}x{spec.width} "
          f"to {args.out}; {facts['defects']} planted defects: "
          + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())))
    return 0

