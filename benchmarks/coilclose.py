"""``bench coil-close``: how long closing a long coil takes (its records merged from every stored component).

A simulated coil of ``--cameras`` x ``--frames`` frames (defaults 2 x 20,000: 40,000 frames, 2.56 km
of 1.58 m strip at 1 mm/px, 128 x 800 px frames, lanes overlapping by 20 px) is written to a SQLite
coil store in batches as the server writes it: about ``--defects`` small blobs of random classes per
frame, a scratch over several frame boundaries every 40 frames and a stain over the lanes' overlap
every 60. Then :meth:`coils.store.CoilStore.close_coil` is timed: read every component, merge them
by union-find into records, store the records and the summary. The issue's target: under 2 s. The
process's CPU time is printed beside the wall time: on a shared machine the wall time also counts
waiting for a core (and the commit's fsync).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HELP = "time closing a 40,000-frame coil in a SQLite coil store (its records merged at close)"
DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else HELP
ALONG_PX, ACROSS_PX, OVERLAP_PX, CLASSES = 128, 800, 20, 4
CHUNK_FRAMES = 64  # frames per camera drawn at a time (and written as one batch per camera)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cameras", type=int, default=2, help="cameras across the strip (default: 2)")
    parser.add_argument("--frames", type=int, default=20_000, help="frames per camera (default: 20000)")
    parser.add_argument("--defects", type=float, default=1.5,
                        help="small blobs per frame and camera on average (default: 1.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", type=Path, default=None, help="the SQLite file (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the report as JSON here")


def bench_line(cameras: int) -> Any:
    from coils.line import Line

    step = ACROSS_PX - OVERLAP_PX
    return Line.from_dict({"name": "bench", "strip_width_mm": float(step * (cameras - 1) + ACROSS_PX), "cameras": [
        {"camera_id": f"cam{c}", "lane_start_mm": float(c * step), "mm_per_px_across": 1.0, "mm_per_px_along": 1.0,
         "along_axis": "y", "frame_width_px": ACROSS_PX, "frame_height_px": ALONG_PX} for c in range(cameras)]})


def draw_chunk(rng: np.random.Generator, frames: int, width: int, first_frame: int, defects: float) -> np.ndarray:
    """``[C, frames * ALONG_PX, width]`` of the strip: blobs, boundary-crossing scratches, lane-crossing stains."""
    import cv2

    canvas = np.zeros((CLASSES, frames * ALONG_PX, width), np.uint8)
    rows = canvas.shape[1]
    for _ in range(rng.poisson(defects * frames * width / ACROSS_PX)):
        centre = (int(rng.integers(width)), int(rng.integers(rows)))
        axes = (int(rng.integers(1, 8)), int(rng.integers(1, 12)))
        cv2.ellipse(canvas[int(rng.integers(CLASSES))], centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    for frame in range(frames):
        top = frame * ALONG_PX + int(rng.integers(ALONG_PX))
        if (first_frame + frame) % 40 == 0 and top + 600 < rows:  # a scratch over 4-5 frame boundaries
            x = int(rng.integers(width))
            cv2.line(canvas[0], (x, top), (x + int(rng.integers(-20, 20)), top + 600), 1, 2)
        if (first_frame + frame) % 60 == 0:  # a stain over the lanes' overlap
            edge = ACROSS_PX - OVERLAP_PX // 2
            cv2.ellipse(canvas[2], (edge, top), (30, 8), 0.0, 0, 360, 1, -1)
    return canvas


def write_coil(store: Any, line: Any, args: argparse.Namespace) -> dict[str, int]:
    """Draws the coil chunk by chunk and writes each camera's frames of a chunk as one batch."""
    from coils.records import FrameKey, masks_components
    from coils.store import FrameComponents

    rng = np.random.default_rng(args.seed)
    step = ACROSS_PX - OVERLAP_PX
    width = step * (len(line.cameras) - 1) + ACROSS_PX
    counts = {"frames": 0, "components": 0}
    for first in range(0, args.frames, CHUNK_FRAMES):
        frames = min(CHUNK_FRAMES, args.frames - first)
        canvas = draw_chunk(rng, frames, width, first, args.defects)
        for c, camera in enumerate(line.cameras):
            batch = []
            for f in range(frames):
                key = FrameKey("BENCH", camera.camera_id, first + f)
                masks = canvas[:, f * ALONG_PX:(f + 1) * ALONG_PX, c * step:c * step + ACROSS_PX]
                position = float((first + f) * ALONG_PX)
                found = masks_components(line, key, position, masks)
                batch.append(FrameComponents(key, position, tuple(found), time.time()))
                counts["components"] += len(found)
            store.write_frames(batch)
            counts["frames"] += len(batch)
    return counts


def measure(args: argparse.Namespace, db: Path) -> dict[str, Any]:
    from coils.store import CoilStore

    line = bench_line(args.cameras)
    store = CoilStore.open(f"sqlite:///{db}", line)
    started = time.perf_counter()
    counts = write_coil(store, line, args)
    written_s = time.perf_counter() - started
    started, cpu = time.perf_counter(), time.process_time()
    summary = store.close_coil("BENCH", None, "end")
    close_s, close_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    store.close()
    return {"cameras": args.cameras, "frames_per_camera": args.frames, **counts, "records": summary.defects,
            "length_m": summary.length_mm / 1000, "write_s": round(written_s, 2), "close_s": round(close_s, 3),
            "close_cpu_s": round(close_cpu_s, 3),
            "database_mib": round(db.stat().st_size / 2**20, 1)}


def run(args: argparse.Namespace) -> int:
    from benchmarks.machine import describe_machine, machine_summary

    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="bench-coil-close-") as folder:
        report = measure(args, args.db or Path(folder) / "coils.db")
    report["machine"] = machine
    print(f"### bench coil-close: {machine_summary(machine)}")
    print(f"{report['cameras']} cameras x {report['frames_per_camera']} frames ({report['frames']} frames, "
          f"{report['length_m']:.0f} m): {report['components']} components stored in {report['write_s']} s, "
          f"{report['records']} records")
    print(f"close_coil: {report['close_s']:.3f} s ({report['close_cpu_s']:.3f} s of CPU; SQLite, "
          f"{report['database_mib']} MiB)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"JSON: {args.json}")
    return 0
