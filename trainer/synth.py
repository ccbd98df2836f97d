"""Synthetic steel-strip line data in the Severstal format: ``trainer synth``.

Frames look like a line-scan camera over a moving strip: the 1600 pixels of a row span the strip's
width and successive rows follow the rolling direction, down the frame. The background is rolled
metal: streaks along the rolling direction (column profiles, unevenly strong down the frame),
brightness drift across the strip, mottling, sensor noise, and now and then the strip's edge with
the dark line bed beside it. Four procedurally distinct defect kinds stand in for the real classes:

1. pits/dents: clusters of small dark hollows;
2. stains: large soft-edged blotches, slightly darker or lighter, with a feathered rim;
3. scratches: long thin bright or dark lines roughly along the rolling direction, in ones to threes;
4. cracks/scabs: large rough dark patches with a ragged outline, grainy texture and crack lines.

Class frequencies follow the real data's imbalance (class 3 most common, class 2 rarest), about
85 % of (image, class) pairs are empty, and some images hold two classes. Each class is given to
an exact number of images, so even small sets hold every class. A defect changes only pixels of
its own mask, so the masks are exactly the drawn shapes; where two defects meet, the one drawn
later owns the pixel, so classes never share one. Everything is drawn with numpy and OpenCV on
small patches; a frame's randomness comes from ``(seed, frame index)`` only.

Sizes scale with the frame (``u = min(height / 256, width / 1600)``). At 256x1600 every defect
covers more than the default minimum area of 200 pixels (pit clusters from about 370, median
about 900; scratches from about 600, median about 1,800; stains and cracks thousands), so the rule
removes specks, not defects. Scratches are 3-7 pixels wide so that they stay clearly above the
background's streaks after the thesis' 2x downscale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np

from engine import rle

log = logging.getLogger(__name__)


KINDS = ("pits/dents", "stains", "scratches", "cracks/scabs")
# Share of images holding each class: the real data's order (3 >> 1 > 4 > 2), with the rare
# classes a little less rare so that small sets still hold them. 0.60 defects per image over
# 4 classes leaves 85 % of (image, class) pairs empty.
CLASS_RATES = (0.12, 0.06, 0.32, 0.10)
JPEG_QUALITY = 92
MAX_CLASSES_PER_IMAGE = 2


# --------------------------------------------------------------------------- noise helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-std smooth noise of ``shape`` from a ``cells`` grid upsampled bicubically."""
    gh, gw = max(2, cells[0]), max(2, cells[1])
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    field = cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _blur1d(values: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(values.astype(np.float32)[None, :], (0, 0), sigmaX=max(sigma, 0.3))[0]


# --------------------------------------------------------------------------- background


def draw_background(rng: np.random.Generator, height: int, width: int, u: float,
                edge_probability: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """Rolled-metal frame (float32 [H, W]) and the bool mask of the steel (False off the strip's edge,
    drawn with ``edge_probability``; the draw is made whatever it is, so the rest follows the seed alike)."""
    x = np.arange(width, dtype=np.float32) / width
    y = np.arange(height, dtype=np.float32) / height
    base = rng.uniform(75.0, 135.0)
    drift_x = np.zeros(width, np.float32)
    for _ in range(2):
        drift_x += rng.uniform(3.0, 11.0) * np.cos(2 * np.pi * (rng.uniform(0.2, 1.3) * x + rng.uniform()))
    drift_y = rng.uniform(-6.0, 6.0) * (y - 0.5)

    # Streaks: a column profile (rolling marks) of fine texture plus a few stronger lines that
    # run the whole frame height, unevenly strong down the frame.
    columns = _blur1d(rng.standard_normal(width), rng.uniform(0.8, 2.5) * max(u, 0.5))
    columns *= rng.uniform(2.5, 5.0) / (columns.std() + 1e-6)
    for _ in range(rng.poisson(4 * width / 1600)):
        centre, spread = rng.uniform(0, width), rng.uniform(0.7, 2.0) * max(u, 0.5)
        columns += (
            rng.choice([-1.0, 1.0])
            * rng.uniform(4.0, 9.0)
            * np.exp(-0.5 * ((np.arange(width) - centre) / spread) ** 2)
        )
    along = 1.0 + 0.3 * _smooth_noise(rng, (height, 1), (4, 1))[:, 0]
    frame = base + drift_x[None, :] + drift_y[:, None] + along[:, None] * columns[None, :]
    # Mottling, stretched along the rolling direction.
    frame += rng.uniform(2.0, 5.0) * _smooth_noise(
        rng, (height, width), (max(2, height // 24), max(2, width // 10))
    )
    frame += rng.normal(0.0, rng.uniform(2.5, 4.5), size=(height, width)).astype(np.float32)

    steel = np.ones((height, width), dtype=bool)
    if rng.uniform() < edge_probability:
        # The strip's edge: beyond it the dark line bed, with a slightly wavy boundary.
        edge = rng.uniform(0.04, 0.25) * width
        wobble = 2.0 * max(u, 0.5) * _smooth_noise(rng, (height, 1), (3, 1))[:, 0]
        cols = np.arange(width, dtype=np.float32)[None, :]
        reach = edge + wobble[:, None]
        steel = cols >= reach if rng.uniform() < 0.5 else cols < width - reach
        bed = rng.uniform(15.0, 35.0) + rng.normal(0.0, 2.0, size=frame.shape).astype(np.float32)
        frame = np.where(steel, frame, bed)
    return frame.astype(np.float32), steel


# --------------------------------------------------------------------------- defect kinds


def _ellipse_field(ry: float, rx: float, reach: float) -> tuple[np.ndarray, int, int]:
    """Squared normalised distance from the centre of a patch reaching ``reach`` radii each way."""
    ph, pw = max(5, int(2 * reach * ry) + 2), max(5, int(2 * reach * rx) + 2)
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
    return ((yy - (ph - 1) / 2) / ry) ** 2 + ((xx - (pw - 1) / 2) / rx) ** 2, ph, pw


def _pits(rng: np.random.Generator, u: float) -> tuple[np.ndarray, np.ndarray]:
    """Class 1: a cluster of small dark hollows, darkest in the middle."""
    spread_y, spread_x = max(4, int(rng.uniform(30, 70) * u)), max(6, int(rng.uniform(40, 140) * u))
    # A border of the largest pit's size keeps every pit whole inside the patch.
    border = int(math.ceil(1.3 * max(2.0, 10.0 * u))) + 1
    ph, pw = spread_y + 2 * border, spread_x + 2 * border
    mask = np.zeros((ph, pw), np.uint8)
    radii = []
    for _ in range(rng.integers(3, 8)):
        r = max(2.0, rng.uniform(5.0, 10.0) * u)
        radii.append(r)
        axes = (max(1, round(r * rng.uniform(0.7, 1.3))), max(1, round(r * rng.uniform(0.7, 1.3))))
        centre = (border + int(rng.uniform(0, spread_x)), border + int(rng.uniform(0, spread_y)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    depth = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    depth = np.clip(depth / (0.6 * float(np.mean(radii))), 0.0, 1.0)
    delta = -rng.uniform(35.0, 70.0) * (0.4 + 0.6 * depth)
    return mask.astype(bool), delta.astype(np.float32)


def _stain(rng: np.random.Generator, u: float, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 2: a soft-edged blotch; the shading fades to nothing at the outline."""
    ry = min(rng.uniform(25.0, 70.0) * u, 0.45 * height)
    rx = rng.uniform(40.0, 120.0) * u
    ellipse, ph, pw = _ellipse_field(ry, rx, reach=1.45)
    level = ellipse + 0.35 * _smooth_noise(rng, (ph, pw), (4, 5))
    # Bounding the outline inside the patch keeps it curved, never cut straight by the patch edge.
    mask = (level < 1.0) & (ellipse < 1.4**2)
    alpha = np.clip((1.0 - level) / 0.45, 0.0, 1.0) * mask
    amplitude = -rng.uniform(14.0, 28.0) if rng.uniform() < 0.7 else rng.uniform(12.0, 22.0)
    shading = 1.0 + 0.2 * _smooth_noise(rng, (ph, pw), (6, 8))
    return mask, (amplitude * alpha * shading).astype(np.float32)


def _scratches(rng: np.random.Generator, u: float, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 3: one to three thin lines along the rolling direction, slightly slanted and wavy."""
    count = int(rng.choice([1, 1, 2, 3]))
    angle = math.radians(float(np.clip(rng.normal(0.0, 10.0), -30.0, 30.0)))
    length = rng.uniform(0.45, 1.0) * height / math.cos(angle)
    thickness = max(1, round(rng.uniform(3.0, 7.0) * u))
    gaps = np.cumsum(np.r_[0.0, rng.uniform(6.0, 25.0, size=count - 1) * max(u, 0.4)])
    margin = int(thickness + 3 * max(u, 0.5) + 2)
    dy, dx = math.cos(angle), math.sin(angle)
    t = np.linspace(-0.5, 0.5, 10)
    lines = []
    for offset in gaps:
        wiggle = rng.normal(0.0, 1.2 * max(u, 0.5), size=t.size)
        ys = t * length * dy
        xs = t * length * dx + offset + wiggle
        lines.append(np.stack([xs, ys], axis=1))
    points = np.concatenate(lines)
    lo = points.min(axis=0) - margin
    ph = int(points[:, 1].max() - lo[1] + margin) + 1
    pw = int(points[:, 0].max() - lo[0] + margin) + 1
    mask = np.zeros((ph, pw), np.uint8)
    for line in lines:
        cv2.polylines(mask, [np.round(line - lo).astype(np.int32)], False, 1, thickness=thickness)
    polarity = 1.0 if rng.uniform() < 0.6 else -1.0
    strength = rng.uniform(30.0, 55.0) * (1.0 + 0.15 * _smooth_noise(rng, (ph, pw), (6, 2)))
    return mask.astype(bool), (polarity * strength * mask).astype(np.float32)


def _crack(rng: np.random.Generator, u: float, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 4: a large rough patch with a ragged outline, grainy texture and dark crack lines."""
    ry = min(rng.uniform(35.0, 100.0) * u, 0.45 * height)
    rx = rng.uniform(60.0, 200.0) * u
    ellipse, ph, pw = _ellipse_field(ry, rx, reach=1.6)
    level = ellipse + 0.6 * _smooth_noise(rng, (ph, pw), (5, 7))
    level += 0.15 * _smooth_noise(rng, (ph, pw), (max(2, ph // 4), max(2, pw // 4)))
    mask = (level < 1.0) & (ellipse < 1.55**2)
    grain = _smooth_noise(rng, (ph, pw), (max(2, ph // 2), max(2, pw // 2)))
    rim = np.clip((1.0 - level) / 0.15, 0.0, 1.0)
    delta = -rng.uniform(25.0, 50.0) * rim + rng.uniform(12.0, 22.0) * grain
    cracks = np.zeros((ph, pw), np.uint8)
    for _ in range(rng.integers(2, 5)):
        steps = rng.integers(4, 9)
        start = np.array([rng.uniform(0, pw), rng.uniform(0, ph)])
        walk = start + np.cumsum(rng.normal(0.0, 0.12 * max(ph, pw), size=(steps, 2)), axis=0)
        cv2.polylines(cracks, [np.round(walk).astype(np.int32)], False, 1, thickness=max(1, round(1.5 * u)))
    delta -= rng.uniform(25.0, 45.0) * cracks
    return mask, (delta * mask).astype(np.float32)


def draw_defect(kind: int, rng: np.random.Generator, u: float, height: int) -> tuple[np.ndarray, np.ndarray]:
    """One defect of 0-based ``kind`` on a patch of its own: its bool mask and grey-level change (float32)."""
    if kind == 0:
        return _pits(rng, u)
    if kind == 1:
        return _stain(rng, u, height)
    if kind == 2:
        return _scratches(rng, u, height)
    return _crack(rng, u, height)


# --------------------------------------------------------------------------- frames


def draw_frame(
    rng: np.random.Generator, height: int, width: int, classes: tuple[int, ...], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """A frame (uint8 ``[H, W]``) with a defect of each 0-based class in ``classes``; masks ``[C, H, W]``."""
    u = min(height / 256, width / 1600)
    frame, steel = draw_background(rng, height, width, u)
    masks = np.zeros((num_classes, height, width), dtype=bool)
    steel_cols = np.flatnonzero(steel.any(axis=0))
    lo, hi = int(steel_cols[0]), int(steel_cols[-1]) + 1
    # Side-by-side slots across the strip, so that two defects mostly sit apart.
    order = rng.permutation(len(classes))
    bounds = np.linspace(lo, hi, len(classes) + 1)
    for slot, k in zip(order, classes):
        patch_mask, delta = draw_defect(k, rng, u, height)
        ph, pw = patch_mask.shape
        a, b = bounds[slot], bounds[slot + 1]
        x0 = int(rng.uniform(a, max(a, b - pw)))
        y0 = int(rng.uniform(0, max(0, height - ph))) if ph <= height else -int(rng.uniform(0, ph - height))
        ys, xs = slice(max(y0, 0), min(y0 + ph, height)), slice(max(x0, 0), min(x0 + pw, width))
        crop = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        m = patch_mask[crop] & steel[ys, xs]
        frame[ys, xs] += np.where(m, delta[crop], 0.0)
        # The later defect owns shared pixels: classes never overlap on a pixel.
        masks[:, ys, xs] &= ~m
        masks[k, ys, xs] |= m
    image = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return image, masks.astype(np.uint8)


def _assign_classes(rng: np.random.Generator, images: int, num_classes: int) -> list[tuple[int, ...]]:
    """Which 0-based classes each image holds: an exact count per class, at most two per image."""
    rates = np.asarray(CLASS_RATES[:num_classes])
    quotas = np.minimum(np.rint(rates * images).astype(np.int64), images)
    quotas[(quotas == 0) & (images >= num_classes)] = 1
    held = [[] for _ in range(images)]
    per_image = np.zeros(images, dtype=np.int64)
    for k in np.argsort(quotas, kind="stable"):
        # Prefer defect-free images; a second class goes to an image a quarter as often.
        weight = np.where(per_image == 0, 1.0, np.where(per_image < MAX_CLASSES_PER_IMAGE, 0.25, 0.0))
        if (weight > 0).sum() < quotas[k]:
            weight = np.where(per_image < num_classes, 1.0, 0.0)
        chosen = rng.choice(images, size=int(quotas[k]), replace=False, p=weight / weight.sum())
        for i in chosen.tolist():
            held[i].append(int(k))
        per_image[chosen] += 1
    return [tuple(sorted(h)) for h in held]


def image_name(seed: int, index: int) -> str:
    """A Severstal-like image id (9 hex digits), stable for (seed, index)."""
    return hashlib.sha1(f"strip-synth/{seed}/{index}".encode()).hexdigest()[:9] + ".jpg"


def _check_request(images: int, height: int, width: int, num_classes: int) -> None:
    if images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    if height < 16 or width < 16:
        raise ValueError(f"frames must be at least 16x16 pixels, got {height}x{width}")
    if not 1 <= num_classes <= len(KINDS):
        raise ValueError(
            f"--classes must be 1..{len(KINDS)} (synth draws {len(KINDS)} defect kinds), got {num_classes}"
        )


def synthesize(
    out: Path,
    images: int,
    height: int = 256,
    width: int = 1600,
    seed: int = 0,
    num_classes: int = 4,
    overwrite: bool = False,
) -> Path:
    """Writes ``out/train_images/*.jpg``, ``out/train.csv`` (new layout) and ``out/synth.json``.

    Args:
        out: the data folder to write.
        images: number of frames.
        height, width: frame size.
        seed: everything drawn follows from it.
        num_classes: 1..4; the first ``num_classes`` defect kinds are drawn.
        overwrite: replace the images, CSV and folds of an earlier synthetic set in ``out``.

    Returns:
        ``out``.

    Raises:
        ValueError: bad sizes or class count.
        FileExistsError: ``out`` already holds a data set and ``overwrite`` is False.
    """
    _check_request(images, height, width, num_classes)
    out = Path(out)
    images_dir, csv_path = _clear_output(out, overwrite)
    held = _assign_classes(np.random.default_rng([seed, 0x5EED]), images, num_classes)
    rows = []
    names = set()
    for index in range(images):
        name = image_name(seed, index)
        if name in names:
            raise RuntimeError(f"image id collision for {name}; use another seed")
        names.add(name)
        image, masks = draw_frame(
            np.random.default_rng([seed, index]), height, width, held[index], num_classes
        )
        if not cv2.imwrite(str(images_dir / name), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"could not write {images_dir / name}")
        for k, encoded in enumerate(rle.encode_batch(masks[None])[0]):
            if encoded:
                rows.append((name, k + 1, encoded))
    rows.sort()
    with open(csv_path, "w", encoding="utf-8") as f:
        f.write("ImageId,ClassId,EncodedPixels\n")
        f.writelines(f"{name},{k},{encoded}\n" for name, k, encoded in rows)
    facts = {"generator": "trainer synth", "images": images, "height": height, "width": width, "seed": seed,
             "num_classes": num_classes, "class_names": list(KINDS[:num_classes]), "defect_rows": len(rows)}
    (out / "synth.json").write_text(json.dumps(facts, indent=2) + "\n")
    log.info("wrote %d images and %d defect rows to %s", images, len(rows), out)
    return out


def _clear_output(out: Path, overwrite: bool) -> tuple[Path, Path]:
    """Makes ``out/train_images/``; an earlier data set there is an error unless ``overwrite``.

    Returns:
        (the images folder, the annotations CSV path).
    """
    images_dir = out / "train_images"
    csv_path = out / "train.csv"
    existing = [p for p in images_dir.glob("*") if p.is_file()] if images_dir.is_dir() else []
    stale = [p for p in (csv_path, out / "folds.csv", out / "synth.json") if p.exists()]
    if (existing or stale) and not overwrite:
        raise FileExistsError(
            f"{out} already holds a data set (train_images/ or train.csv); "
            f"choose an empty folder or pass --force"
        )
    for p in existing + stale:
        p.unlink()
    images_dir.mkdir(parents=True, exist_ok=True)
    return images_dir, csv_path


