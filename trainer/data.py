"""Severstal-format data: ``train.csv`` annotations, image files, samples and the training dataset.

A data folder holds ``train_images/`` (JPEG or PNG frames) and ``train.csv`` in either published
layout:

* ``ImageId,ClassId,EncodedPixels``: one row per defective (image, class) pair;
* ``ImageId_ClassId,EncodedPixels``: the older layout, one row per (image, class), empty = no defect.

Images in the folder without rows are defect-free. Masks are decoded by :mod:`engine.rle`, the
project's one RLE implementation, and downscaled by the same functions the exported inspection
graph runs (:func:`network.processing.resize`, :func:`network.processing.downscale_masks`), so training sees
exactly what inference computes.

This module imports torch (for the dataset); command-line modules import it inside ``run``.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch.utils.data import Dataset

from engine import rle
from engine.decode import FrameRejected, decode_encoded
from network.processing import downscale_masks, resize
from trainer.balance import TRANSFORMS, apply_transform
from trainer.samples import ANNOTATIONS_FILE, IMAGE_SUFFIXES, IMAGES_DIR, MAX_IMAGE_PIXELS, DataConfig, Sample

log = logging.getLogger(__name__)

NEW_LAYOUT = ("ImageId", "ClassId", "EncodedPixels")
OLD_LAYOUT = ("ImageId_ClassId", "EncodedPixels")


# --------------------------------------------------------------------------- annotations


def _read_rows(
    csv_path: Path, num_classes: int, height: int | None, width: int | None
) -> dict[str, tuple[int, list[str]]]:
    """image id -> (first CSV line naming it, one RLE per class)."""
    csv_path = Path(csv_path)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not csv_path.is_file():
        raise FileNotFoundError(f"annotations file {csv_path} does not exist")
    out: dict[str, tuple[int, list[str]]] = {}
    seen: dict[tuple[str, int], int] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = _read_header(csv_path, next(reader, None))
        for row in reader:
            line = reader.line_num
            where = f"{csv_path}:{line}"
            if not row or all(not cell.strip() for cell in row):
                continue
            image_id, class_id, encoded = _parse_row(row, header, where, num_classes)
            if (image_id, class_id) in seen:
                raise ValueError(
                    f"{where}: duplicate row for image {image_id} class {class_id} "
                    f"(first at line {seen[image_id, class_id]})"
                )
            seen[image_id, class_id] = line
            if encoded and height is not None and width is not None:
                try:
                    rle.decode(encoded, height, width)
                except ValueError as exc:
                    raise ValueError(
                        f"{where}: malformed EncodedPixels for image {image_id} class {class_id}: {exc}"
                    ) from None
            entry = out.setdefault(image_id, (line, [""] * num_classes))
            entry[1][class_id - 1] = encoded
    return out


def _read_header(csv_path: Path, header: list[str] | None) -> tuple[str, ...]:
    """The CSV's layout (:data:`NEW_LAYOUT` or :data:`OLD_LAYOUT`), or a ValueError naming the file."""
    if header is None:
        raise ValueError(f"{csv_path}: empty file; expected a header {','.join(NEW_LAYOUT)} or {','.join(OLD_LAYOUT)}")
    header_t = tuple(h.strip() for h in header)
    if header_t not in (NEW_LAYOUT, OLD_LAYOUT):
        raise ValueError(
            f"{csv_path}:1: unexpected header {','.join(header)!r}; expected "
            f"{','.join(NEW_LAYOUT)!r} or {','.join(OLD_LAYOUT)!r}"
        )
    return header_t


def _parse_row(row: list[str], header: tuple[str, ...], where: str, num_classes: int) -> tuple[str, int, str]:
    """(image id, class id, stripped RLE) of one CSV row in either layout; a ValueError names ``where``."""
    if len(row) != len(header):
        raise ValueError(f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(row)}")
    if header == OLD_LAYOUT:
        key, encoded = row[0].strip(), row[1]
        image_id, sep, class_text = key.rpartition("_")
        if not sep or not image_id:
            raise ValueError(f"{where}: ImageId_ClassId {key!r} is not of the form '<image>_<class id>'")
    else:
        image_id, class_text, encoded = row[0].strip(), row[1], row[2]
        if not image_id:
            raise ValueError(f"{where}: empty ImageId")
    try:
        class_id = int(class_text.strip())
    except ValueError:
        raise ValueError(f"{where}: ClassId {class_text.strip()!r} is not an integer") from None
    if not 1 <= class_id <= num_classes:
        raise ValueError(f"{where}: ClassId {class_id} out of range 1..{num_classes} (image {image_id})")
    return image_id, class_id, encoded.strip()


def read_annotations(
    csv_path: Path, num_classes: int, height: int | None = None, width: int | None = None
) -> dict[str, list[str]]:
    """Reads a Severstal ``train.csv`` (either layout) into image id -> one RLE per class.

    Every image named by a row is a key, also when all its RLEs are empty (old layout).

    Args:
        csv_path: the CSV file.
        num_classes: class ids must be 1..num_classes.
        height, width: the frame size; when given, every RLE is decoded at that size so a
            malformed one is reported with its line (:func:`load_samples` always passes them).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: bad header, wrong field count, ClassId not an integer or out of range,
            duplicate (image, class) row, malformed RLE; the message names file and line.
    """
    return {k: v[1] for k, v in _read_rows(csv_path, num_classes, height, width).items()}


# --------------------------------------------------------------------------- samples


def _image_files(images_dir: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in images_dir.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    }


def load_samples(data_dirs: Path | Sequence[Path], cfg: DataConfig) -> list[Sample]:
    """Every image of one or more data folders, with its masks, sorted by image id.

    Raises:
        FileNotFoundError: a folder, its ``train_images/`` or ``train.csv`` is missing, or a CSV
            row names an image that is not in ``train_images/`` (the message names the line).
        ValueError: any CSV problem (see :func:`read_annotations`); the same image id in two folders.
    """
    dirs = [Path(data_dirs)] if isinstance(data_dirs, (str, Path)) else [Path(d) for d in data_dirs]
    if not dirs:
        raise ValueError("no data folder given")
    samples: dict[str, Sample] = {}
    for data_dir in dirs:
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data folder {data_dir} does not exist")
        images_dir = data_dir / IMAGES_DIR
        if not images_dir.is_dir():
            raise FileNotFoundError(f"data folder {data_dir} has no {IMAGES_DIR}/ folder of images")
        csv_path = data_dir / ANNOTATIONS_FILE
        rows = _read_rows(csv_path, cfg.num_classes, cfg.height, cfg.width)
        files = _image_files(images_dir)
        for image_id, (line, _) in rows.items():
            if image_id not in files:
                raise FileNotFoundError(f"{csv_path}:{line}: image {image_id} not found in {images_dir}")
        for image_id, path in files.items():
            if image_id in samples:
                raise ValueError(
                    f"image {image_id} is in two data folders: {samples[image_id].source} and {data_dir}"
                )
            rles = rows[image_id][1] if image_id in rows else [""] * cfg.num_classes
            samples[image_id] = Sample(image_id=image_id, path=path, rles=tuple(rles), source=data_dir)
        log.debug("%s: %d images, %d with annotation rows", data_dir, len(files), len(rows))
    return [samples[k] for k in sorted(samples)]


# --------------------------------------------------------------------------- pixels




def read_image(path: Path, cfg: DataConfig) -> np.ndarray:
    """Reads an image file as uint8 grayscale ``[H, W]`` (Severstal JPEGs are three equal channels),
    with the server's decoder (:mod:`engine.decode`): EXIF orientation ignored, corrupt or truncated
    data refused, so training sees each frame exactly as the server would.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded, or its size is not the configured frame size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        image = decode_encoded(path.read_bytes(), None, MAX_IMAGE_PIXELS)
    except FrameRejected as exc:
        raise ValueError(f"image file {path} cannot be read: {exc}") from None
    if image.shape != cfg.size:
        raise ValueError(
            f"image file {path} is {image.shape[1]}x{image.shape[0]} (width x height), expected "
            f"{cfg.width}x{cfg.height}"
        )
    return image


def sample_masks(sample: Sample, cfg: DataConfig) -> np.ndarray:
    """uint8 0/1 masks ``[C, H, W]`` of a sample, decoded by :mod:`engine.rle`."""
    if len(sample.rles) != cfg.num_classes:
        raise ValueError(
            f"image {sample.image_id} has {len(sample.rles)} class masks, expected {cfg.num_classes}"
        )
    try:
        return rle.decode_many(sample.rles, cfg.height, cfg.width)
    except ValueError as exc:
        raise ValueError(f"image {sample.image_id}: {exc}") from None


Item = Union[Sample, tuple[Sample, Union[str, None]]]


def _as_pair(item: Item) -> tuple[Sample, str | None]:
    if isinstance(item, Sample):
        return item, None
    sample, transform = item
    if not isinstance(sample, Sample):
        raise TypeError(f"expected a Sample or (Sample, transform name), got {type(item).__name__}")
    return sample, transform


def _checked_items(items: Sequence[Item]) -> list[tuple[Sample, str | None]]:
    pairs = [_as_pair(item) for item in items]
    for sample, name in pairs:
        if name is not None and name not in TRANSFORMS:
            raise ValueError(f"image {sample.image_id}: unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")
    return pairs


class SeverstalDataset(Dataset):
    """Images and masks for training: ``(image uint8 [h, w], masks uint8 [C, h, w])``.

    Args:
        items: samples, or ``(sample, transform name)`` pairs from :func:`trainer.balance.balance_plan`.
        cfg: the data configuration (frame size, classes).
        scale: downscale factor; ``(h, w) = (round(H * scale), round(W * scale))``. Images go
            through :func:`network.processing.resize` and are rounded back to uint8, masks through
            :func:`network.processing.downscale_masks`, as in the exported graph. A transform is applied
            at full resolution, before downscaling.
        augment: a random augmentation (:class:`trainer.augment_random.RandomAugment`), applied at
            full resolution after the transform; indices may then be ``(index, epoch)`` pairs
            (from :class:`trainer.augment_random.EpochSampler`), which seed each record's draw.
    """

    def __init__(self, items: Sequence[Item], cfg: DataConfig, scale: float = 1.0,
                 augment: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.items = _checked_items(items)
        self.cfg = cfg
        self.scale = float(scale)
        self.size = cfg.scaled_size(self.scale)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = index if isinstance(index, tuple) else (index, 0)
        sample, transform = self.items[index]
        image = torch.from_numpy(read_image(sample.path, self.cfg))
        masks = torch.from_numpy(sample_masks(sample, self.cfg))
        if transform is not None:
            image, masks = apply_transform(image, masks, transform)
        if self.augment is not None:
            image, masks = self.augment(image, masks, index, epoch)
        if self.size != self.cfg.size:
            scaled = resize(image[None, None].to(torch.float32), self.size)[0, 0]
            image = scaled.round_().clamp_(0, 255).to(torch.uint8)
            masks = downscale_masks(masks[None], self.size)[0].to(torch.uint8)
        return image, masks


#: Memory a :class:`TrainingFrames` may keep decoded records in (per process), by default.
CACHE_BYTES = 2 << 30


class TrainingFrames(Dataset):
    """Training and validation records at the training resolution, for ``trainer fit``:
    ``(image float32 [h, w] in [0, 1], masks uint8 [C, h, w])``.

    Each image is decoded, its masks drawn, and both brought to the training size ``size`` once, as
    the exported graph brings a frame there (:func:`network.processing.resize` of ``x / 255``, and
    :func:`network.processing.downscale_masks`); :func:`network.processing.scaled_input` then normalises them as
    :func:`network.processing.preprocess` does. Scaled records are kept in memory up to ``cache_bytes``
    (per process: each loader worker keeps its own), so later epochs decode nothing. A record's
    balancing transform and its random augmentation apply at the training resolution, after the
    resize: at scale 0.25 that is 16x fewer pixels than the full frame, and nothing is decoded or
    downscaled again after the first epoch.

    Args:
        items: samples, or ``(sample, transform name)`` pairs from :func:`trainer.balance.balance_plan`.
        cfg: the data configuration (frame size, classes).
        size: the training (height, width).
        augment: as for :class:`SeverstalDataset`; indices may be ``(index, epoch)`` pairs.
        cache_bytes: most bytes of scaled records to keep (0: none).
    """

    def __init__(self, items: Sequence[Item], cfg: DataConfig, size: tuple[int, int],
                 augment: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.items = _checked_items(items)
        self.cfg, self.size, self.augment = cfg, (int(size[0]), int(size[1])), augment
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def scaled(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        """One image and its masks at the training size (from the cache when there)."""
        key = (str(sample.path), sample.image_id)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        image = torch.from_numpy(read_image(sample.path, self.cfg)).to(torch.float32) * (1.0 / 255.0)
        masks = torch.from_numpy(sample_masks(sample, self.cfg))
        if self.size != self.cfg.size:
            image = resize(image[None, None], self.size, src_size=self.cfg.size)[0, 0]
            masks = downscale_masks(masks[None], self.size)[0].to(torch.uint8)
        image = image.contiguous()
        size = image.numel() * image.element_size() + masks.numel()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = (image, masks)
            self._cached_bytes += size
        return image, masks

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = index if isinstance(index, tuple) else (index, 0)
        sample, transform = self.items[index]
        image, masks = self.scaled(sample)
        if transform is not None:
            image, masks = apply_transform(image, masks, transform)
        if self.augment is not None:
            image, masks = self.augment(image, masks, index, epoch)
        # Transforms return new tensors; without any, hand out copies so no caller can change the cache.
        if transform is None and self.augment is None:
            image, masks = image.clone(), masks.clone()
        return image, masks


def loader_context(workers: int):
    """The multiprocessing context for a DataLoader with ``workers`` worker processes (None for none).

    Workers are forked from a forkserver that has imported this module (and so torch) once, never
    from the calling process: that process may hold gRPC, OpenVINO or ONNX Runtime threads (a test
    that serves a model and then scores it, ``trainer evaluate --model``), and forking a process
    with gRPC threads running aborted it (``Fatal Python error: Aborted`` in the DataLoader).
    """
    if workers <= 0:
        return None

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx
