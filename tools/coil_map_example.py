"""The coil map picture of docs/coils.md: :func:`coils.coilmap.render_map` on a ``trainer synth-line`` coil.

No model and no server: the coil's true masks (``masks.csv``) go through the record builder as a
perfect model's answers would, so the picture shows every planted kind: plain defects, ones over a
frame boundary or two lanes, a long scratch, and the roll mark repeating along the strip's edge (its
repeats linked and its period written: :mod:`coils.periodic`).
``server coils map COIL --out map.png`` draws a served coil's map the same way.

    .venv/bin/python tools/coil_map_example.py --out docs/coil-map.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from coils.coilmap import render_map
from coils.line import load_line
from coils.line_folder import LINE_FILE, TRUTH_JSON, read_frames, read_masks
from coils.periodic import find_periodic
from coils.records import RecordBuilder
from coils.summary import CoilFacts, summarise
from engine import rle
from trainer.synth_line import LineSpec, synthesize_line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/coil-map.png"), help=".png or .svg")
    parser.add_argument("--cameras", type=int, default=3)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        synthesize_line(out, LineSpec(cameras=args.cameras, frames=args.frames, seed=args.seed))
        line, masks = load_line(out / LINE_FILE), read_masks(out)
        builder = RecordBuilder(line)
        for frame in read_frames(out):
            camera = line.camera(frame.camera_id)
            planes = np.zeros((4, camera.frame_height_px, camera.frame_width_px), np.uint8)
            for class_id, code in masks.get((frame.camera_id, frame.frame_id), {}).items():
                planes[class_id - 1] = rle.decode(code, camera.frame_height_px, camera.frame_width_px)
            builder.add_frame(frame.coil_id, frame.camera_id, frame.frame_id, frame.position_mm, planes)
        coil = json.loads((out / TRUTH_JSON).read_text())["coils"][0]
    records = builder.records(coil["coil_id"])
    start = 1_780_000_000.0  # a fixed time: the picture does not change from run to run
    facts = CoilFacts(coil["coil_id"], "closed", start, start + 60, start + 61, "end", coil["length_mm"],
                      builder.frames_added, 0)
    written = render_map(line, summarise(facts, records), records, args.out, periodic=find_periodic(line, records))
    print(f"{written}: {len(records)} defect records of coil {coil['coil_id']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
