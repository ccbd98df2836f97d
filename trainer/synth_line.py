"""A line to test coils on: ``trainer synth-line`` writes coils as a line's cameras see them.

Several cameras stand side by side across the strip, neighbours' lanes overlapping by a known
number of pixels; an encoder triggers every camera once per frame length, so frame ``f`` of a coil
starts ``f x frame length`` from the coil's head. Defects are planted on the coil in coil
pixels (the shapes of ``trainer synth``, each kept to its largest 8-connected part so that one
planted defect is one physical defect), and every frame shows the part of each defect inside its
window, over a background of its own at the coil's brightness. Planted per coil:

* ``boundary``: a defect over a boundary between two frames, in one lane;
* ``lane``: a defect over the middle of two neighbouring lanes' overlap;
* ``both``: a defect over a frame boundary and a lane overlap at once;
* ``long``: a scratch running along several frames;
* ``roll_mark``: one imprint repeated every circumference of the line's roll (π x diameter);
* ``plain``: a few defects elsewhere.

Planted defects keep a margin of clean strip between them, so each is one record. The folder's
layout is :mod:`coils.line_folder`'s; the truth is in coil coordinates (mm along from the head,
mm across from the operator-side edge, area in mm²).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from coils.line import CameraGeometry, Line, Roll, write_line
from coils.line_folder import (
    FRAMES_FILE,
    LINE_FILE,
    MASKS_FILE,
    LineFrame,
    TruthDefect,
    write_frames,
    write_masks,
    write_truth,
)
from engine import rle
from trainer.synth import JPEG_QUALITY, KINDS, draw_background, draw_defect

log = logging.getLogger(__name__)

#: Clean pixels kept between two planted defects (more than the records' merge distance).
MARGIN_PX = 4
IMAGE_FORMATS = ("jpg", "png")


@dataclass(frozen=True)
class LineSpec:
    """What ``trainer synth-line`` draws.

    Attributes:
        cameras: cameras side by side across the strip (``cam0`` at the operator side).
        frames: frames per camera per coil.
        height, width: a frame's pixels along (rows) and across (columns).
        overlap_px: columns neighbouring lanes share.
        mm_per_px: a pixel's size, along and across.
        roll_diameter_mm: the roll that prints the marks; None: a period of 3.7 frames.
        plain_defects: defects planted elsewhere per coil; None: one per 8 frames, at least one.
    """

    cameras: int = 2
    frames: int = 200
    coils: int = 1
    height: int = 256
    width: int = 1600
    overlap_px: int = 64
    mm_per_px: float = 0.5
    roll_diameter_mm: float | None = None
    plain_defects: int | None = None
    seed: int = 0
    image_format: str = "jpg"

    def __post_init__(self) -> None:
        if self.cameras < 1 or self.coils < 1:
            raise ValueError(f"--cameras and --coils must be >= 1, got {self.cameras} and {self.coils}")
        if self.frames < 4:
            raise ValueError(f"--frames must be >= 4 (boundaries and a long scratch need room), got {self.frames}")
        if self.height < 16 or self.width < 16:
            raise ValueError(f"frames must be at least 16x16 pixels, got {self.height}x{self.width}")
        if not 0 <= self.overlap_px <= self.width // 4:
            raise ValueError(f"--overlap-px must lie in 0..width/4 ({self.width // 4}), got {self.overlap_px}")
        if not (math.isfinite(self.mm_per_px) and self.mm_per_px > 0):
            raise ValueError(f"--mm-per-px must be a positive number, got {self.mm_per_px}")
        if self.roll_diameter_mm is not None and not self.roll_diameter_mm > 0:
            raise ValueError(f"--roll-diameter-mm must be positive, got {self.roll_diameter_mm}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")

    @property
    def strip_px(self) -> int:
        return self.cameras * self.width - (self.cameras - 1) * self.overlap_px

    def lane_left(self, camera: int) -> int:
        """The coil column of camera ``camera``'s first pixel."""
        return camera * (self.width - self.overlap_px)

    def line(self) -> Line:
        px = self.mm_per_px
        diameter = self.roll_diameter_mm or 3.7 * self.height * px / math.pi
        cameras = tuple(CameraGeometry(f"cam{c}", self.lane_left(c) * px, px, px, "y", self.width, self.height)
                        for c in range(self.cameras))
        return Line("synth-line", self.strip_px * px, cameras, (Roll("work-roll", diameter),))


@dataclass(frozen=True)
class Planting:
    """One planted defect in coil pixels: its tight mask, the grey-level change, where and why."""

    class_index: int  # 0-based
    top: int
    left: int
    mask: np.ndarray
    delta: np.ndarray
    kind: str
    roll: str = ""

    @property
    def bottom(self) -> int:
        return self.top + self.mask.shape[0]

    @property
    def right(self) -> int:
        return self.left + self.mask.shape[1]


def _connected_shape(class_index: int, rng: np.random.Generator, u: float, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``trainer synth`` defect kept to its largest 8-connected part, cropped to it."""
    mask, delta = draw_defect(class_index, rng, u, height)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    label = 1 + int(np.argmax(stats[1:count, cv2.CC_STAT_AREA]))
    left, top, width, tall = (int(v) for v in stats[label, :4])
    keep = labels[top:top + tall, left:left + width] == label
    return keep, np.where(keep, delta[top:top + tall, left:left + width], 0.0).astype(np.float32)


def _long_scratch(rng: np.random.Generator, u: float, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 3: a thin line ``rows`` long, slightly slanted and wavy (one connected stroke)."""
    thickness = max(1, round(rng.uniform(3.0, 6.0) * u))
    t = np.linspace(0.0, 1.0, max(3, rows // 16))
    xs = t * rng.uniform(-0.05, 0.05) * rows + rng.normal(0.0, max(u, 0.5), size=t.size)
    xs -= xs.min() - thickness
    points = np.stack([xs, t * (rows - 1 - 2 * thickness) + thickness], axis=1)
    mask = np.zeros((rows, int(xs.max()) + 2 * thickness + 1), np.uint8)
    cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 1, thickness=thickness)
    rows_used = np.flatnonzero(mask.any(axis=1))
    cols_used = np.flatnonzero(mask.any(axis=0))
    mask = mask[rows_used[0]:rows_used[-1] + 1, cols_used[0]:cols_used[-1] + 1].astype(bool)
    polarity = 1.0 if rng.uniform() < 0.6 else -1.0
    return mask, (polarity * rng.uniform(35.0, 55.0) * mask).astype(np.float32)


class _Plan:
    """The defects planted on one coil, each with a margin of clean strip around it."""

    def __init__(self, spec: LineSpec, rng: np.random.Generator) -> None:
        self.spec, self.rng = spec, rng
        self.rows, self.cols = spec.frames * spec.height, spec.strip_px
        self.u = min(spec.height / 256, spec.width / 1600)
        self.placed: list[Planting] = []

    def in_overlap(self, left: int, right: int) -> bool:
        spec = self.spec
        return any(left < spec.lane_left(c) + spec.width and right > spec.lane_left(c + 1)
                   for c in range(spec.cameras - 1))

    def put(self, shape: tuple[np.ndarray, np.ndarray], top: int, left: int, kind: str, class_index: int,
            roll: str = "") -> bool:
        """Plants ``shape`` with its top-left pixel at (top, left) when it fits and keeps its margin."""
        mask, delta = shape
        bottom, right = top + mask.shape[0], left + mask.shape[1]
        if top < 0 or left < 0 or bottom > self.rows or right > self.cols:
            return False
        for p in self.placed:
            if (top < p.bottom + MARGIN_PX and p.top < bottom + MARGIN_PX and left < p.right + MARGIN_PX
                    and p.left < right + MARGIN_PX):
                return False
        self.placed.append(Planting(class_index, top, left, mask, delta, kind, roll))
        return True

    def shape(self, class_index: int) -> tuple[np.ndarray, np.ndarray]:
        return _connected_shape(class_index, self.rng, self.u, self.spec.height)

    def plant(self, kind: str, class_index: int, shape: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Plants one defect of ``kind`` at a random place that makes it that kind; RuntimeError after 200 tries."""
        spec, rng = self.spec, self.rng
        for _ in range(200):
            mask, delta = shape or self.shape(class_index)
            h, w = mask.shape
            top = int(rng.integers(0, max(1, self.rows - h)))
            left = int(rng.integers(0, max(1, self.cols - w)))
            if kind in ("boundary", "both"):
                top = int(rng.integers(1, spec.frames)) * spec.height - h // 2
            if kind in ("lane", "both"):
                left = spec.lane_left(int(rng.integers(1, spec.cameras))) + spec.overlap_px // 2 - w // 2
            elif kind != "plain" and self.in_overlap(left, left + w):
                continue
            if kind in ("boundary", "both") and h < 2:
                continue
            if self.put((mask, delta), top, left, kind, class_index):
                return
        raise RuntimeError(f"could not plant a {kind} defect of class {class_index + 1} on a "
                           f"{self.rows}x{self.cols} px coil; draw more frames or cameras")

    def roll_marks(self, roll: Roll) -> None:
        """One pit imprint repeated every circumference of ``roll`` along one column."""
        spec, rng = self.spec, self.rng
        period = roll.circumference_mm / spec.mm_per_px
        mask, delta = self.shape(0)
        for _ in range(200):
            left = int(rng.integers(0, max(1, self.cols - mask.shape[1])))
            if not self.in_overlap(left, left + mask.shape[1]):
                break
        first = int(rng.integers(0, max(1, int(period))))
        turn = 0
        while (top := first + round(turn * period)) + mask.shape[0] <= self.rows:
            if not self.put((mask, delta), top, left, "roll_mark", 0, roll.name):
                raise RuntimeError(f"roll marks every {period:.1f} px overlap each other; a larger roll is needed")
            turn += 1


def plan_coil(spec: LineSpec, coil_index: int) -> list[Planting]:
    """The defects of coil ``coil_index``: roll marks, a long scratch, crossing ones, plain ones."""
    plan = _Plan(spec, np.random.default_rng([spec.seed, coil_index, 0x11E]))
    plan.roll_marks(spec.line().rolls[0])
    rows = min(spec.frames - 1, 6) * spec.height - 2 * MARGIN_PX
    plan.plant("long", 2, _long_scratch(plan.rng, plan.u, rows))
    kinds = ["boundary", "boundary"] + (["lane", "lane", "both"] if spec.cameras > 1 else [])
    for kind in kinds:
        plan.plant(kind, int(plan.rng.integers(len(KINDS))))
    for _ in range(spec.plain_defects if spec.plain_defects is not None else spec.frames // 8 + 1):
        plan.plant("plain", int(plan.rng.integers(len(KINDS))))
    return plan.placed


def render_frame(spec: LineSpec, plantings: list[Planting], coil_index: int, camera: int,
                 frame: int) -> tuple[np.ndarray, np.ndarray]:
    """What camera ``camera`` sees of frame ``frame``: the image uint8 ``[H, W]`` and the true masks ``[4, H, W]``."""
    h, w = spec.height, spec.width
    rng = np.random.default_rng([spec.seed, coil_index, camera, frame])
    image, _ = draw_background(rng, h, w, min(h / 256, w / 1600), edge_probability=0.0)
    # One strip, one brightness: every frame of a coil is brought to the coil's level (the background
    # generator draws a level per frame, which would band the strip frame by frame).
    image += np.random.default_rng([spec.seed, coil_index, 0x1E7E1]).uniform(85.0, 125.0) - image.mean()
    masks = np.zeros((len(KINDS), h, w), np.uint8)
    top, left = frame * h, spec.lane_left(camera)
    for p in plantings:
        rows = slice(max(p.top, top), min(p.bottom, top + h))
        cols = slice(max(p.left, left), min(p.right, left + w))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        patch = (slice(rows.start - p.top, rows.stop - p.top), slice(cols.start - p.left, cols.stop - p.left))
        window = (slice(rows.start - top, rows.stop - top), slice(cols.start - left, cols.stop - left))
        image[window] += p.delta[patch]
        masks[p.class_index][window] |= p.mask[patch]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), masks


def truth_of(spec: LineSpec, coil_id: str, plantings: list[Planting]) -> list[TruthDefect]:
    """The planted defects in coil coordinates, sorted by along start, across start and class."""
    px = spec.mm_per_px
    found = [TruthDefect(coil_id, p.class_index + 1, p.top * px, p.bottom * px, p.left * px, p.right * px,
                         float(p.mask.sum()) * px * px, p.kind, p.roll) for p in plantings]
    return sorted(found, key=lambda d: (d.along_start_mm, d.across_start_mm, d.class_id))


def coil_name(spec: LineSpec, coil_index: int) -> str:
    return f"coil-{spec.seed}-{coil_index:03d}"


def synthesize_line(out: Path, spec: LineSpec, overwrite: bool = False) -> dict:
    """Writes a line folder (:mod:`coils.line_folder`) of ``spec.coils`` coils; returns its facts.

    Raises:
        FileExistsError: ``out`` already holds a line folder and ``overwrite`` is False.
    """
    out = Path(out)
    if (out / FRAMES_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a line folder ({FRAMES_FILE}); choose another or pass --force")
    line = spec.line()
    write_line(out / LINE_FILE, line)
    frames, masks, truth, coils = [], [], [], []
    for coil_index in range(spec.coils):
        coil_id = coil_name(spec, coil_index)
        plantings = plan_coil(spec, coil_index)
        truth += truth_of(spec, coil_id, plantings)
        coils.append({"coil_id": coil_id, "length_mm": spec.frames * line.cameras[0].frame_length_mm})
        for f in range(spec.frames):
            for c, camera in enumerate(line.cameras):
                frame_id = coil_index * spec.frames + f
                file = f"{camera.camera_id}/{coil_id}-{f:05d}.{spec.image_format}"
                image, frame_masks = render_frame(spec, plantings, coil_index, c, f)
                _write_image(out / file, image)
                frames.append(LineFrame(camera.camera_id, frame_id, coil_id, f * camera.frame_length_mm, file))
                masks += [(camera.camera_id, frame_id, k + 1, encoded)
                          for k, encoded in enumerate(rle.encode_batch(frame_masks[None])[0]) if encoded]
    write_frames(out / FRAMES_FILE, frames)
    write_masks(out / MASKS_FILE, masks)
    facts = {"generator": "trainer synth-line", "spec": asdict(spec), "line": line.to_dict(), "coils": coils}
    write_truth(out, truth, facts)
    log.info("wrote %d coils, %d frames and %d planted defects to %s", spec.coils, len(frames), len(truth), out)
    return {**facts, "frames": len(frames), "defects": len(truth)}


def _write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.suffix == ".jpg" else []
    if not cv2.imwrite(str(path), image, options):
        raise OSError(f"could not write {path}")
