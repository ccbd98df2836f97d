"""The drift reference a model carries: line statistics of a sample of its run's training frames, and
their per-class predicted areas from out-of-fold predictions.

``trainer export`` calls :func:`build_drift_reference`: a seeded sample of the run's non-holdout
training frames (:func:`drift_sample`), read at the camera's resolution, each predicted by the one
fold model that did not train on it, with the export's thresholds; the statistics themselves are
:func:`engine.drift.build_reference`. The run's ``config.json`` names its data folders and
``folds.csv`` its split; a run copied away from its data gets no reference (with a warning)
unless its data folders are given.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine import devices
from engine.devices import parse_device
from engine.drift import DEFAULT_BINS, build_reference
from engine.metadata import ModelMetadata
from network.inspection import InspectionModel
from trainer import rundir
from trainer.config import DEFAULT_DRIFT_FRAMES
from trainer.data import DataConfig, load_samples, read_image
from trainer.splits import HOLDOUT, read_folds

if TYPE_CHECKING:
    from torch import nn

    from engine.drift import DriftReference
    from trainer.samples import Sample

log = logging.getLogger(__name__)

#: Training frames sampled for the drift reference (0 = none).
#: Seeds the choice of frames, so re-exporting a run gives the same reference.
DRIFT_SEED = 0
#: Full-resolution frames per out-of-fold prediction batch (8 x 256 x 1600 frames hold ~50 MB of
#: probabilities per class on the device).
DRIFT_BATCH = 8


@dataclass
class DriftSummary:
    """How the drift reference was built, or why there is none.

    Attributes:
        frames: training frames in the reference (0 = no reference).
        seconds: time spent reading frames, predicting and binning.
        image_ids: the sampled images, in the order their statistics were taken.
        frames_per_fold: ``{fold: frames}`` predicted by each fold model (out of fold).
        data: the data folders the frames came from.
        skipped: why no reference was written (``--drift-frames 0``, data not found, ...).
    """

    frames: int = 0
    seconds: float = 0.0
    image_ids: list[str] = field(default_factory=list)
    frames_per_fold: dict[int, int] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    skipped: str | None = None

    def summary(self) -> str:
        if self.skipped is not None:
            return f"none ({self.skipped})"
        folds = ", ".join(f"fold {k}: {n}" for k, n in self.frames_per_fold.items())
        return f"{self.frames} training frames, areas out of fold ({folds}), built in {self.seconds:.1f} s"

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "image_ids": list(self.image_ids),
            "frames_per_fold": {str(k): n for k, n in self.frames_per_fold.items()},
            "data": list(self.data),
            "skipped": self.skipped,
        }


class _NoDriftData(Exception):
    """The run's training frames cannot be found: export goes on without a drift reference."""


def _recorded_data(run_dir: Path) -> list[Path]:
    """The data folders ``trainer fit`` recorded in ``RUN/config.json``."""
    path = run_dir / rundir.CONFIG
    if not path.is_file():
        raise _NoDriftData(f"{path} does not exist, so the run's data folders are unknown")
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("data")
    except (json.JSONDecodeError, AttributeError):
        raise _NoDriftData(f"{path} is not the JSON object 'trainer fit' writes") from None
    if not recorded or not isinstance(recorded, list):
        raise _NoDriftData(f"{path} records no data folders")
    return [Path(d) for d in recorded]


def drift_sample(
    run_dir: str | Path, fold_ids: Sequence[int], meta: ModelMetadata, frames: int,
    data_dirs: Sequence[str | Path] | None = None, seed: int = DRIFT_SEED,
) -> tuple[list[Any], dict[str, int], list[Path]]:
    """The training images a drift reference is built from, and the fold that did not train on each.

    Up to ``frames`` images, drawn with ``seed`` from the non-holdout images of ``RUN/folds.csv``
    whose fold is among ``fold_ids`` (a fold model was not trained on its own fold's images), in
    image-id order.

    Args:
        run_dir: the training run.
        fold_ids: the folds whose models predict the sample.
        meta: the model's metadata (class count and frame size of the data).
        frames: the most images to draw.
        data_dirs: the run's data folders; None = those recorded in ``RUN/config.json``.
        seed: seeds the draw.

    Returns:
        (samples, ``{image id: fold}``, the data folders).

    Raises:
        FileNotFoundError: ``data_dirs`` given but a folder, ``folds.csv`` or the images are missing.
        _NoDriftData: the same problems with the recorded data folders (the run was copied away).
    """
    run_dir = Path(run_dir)
    explicit = data_dirs is not None
    missing_error = FileNotFoundError if explicit else _NoDriftData
    dirs = [Path(d) for d in data_dirs] if explicit else _recorded_data(run_dir)
    absent = ", ".join(str(d) for d in dirs if not d.is_dir())
    if absent and explicit:
        raise FileNotFoundError(f"--data {absent}: no such data folder")
    if absent:
        raise _NoDriftData(f"{run_dir / rundir.CONFIG} names the data folder {absent}, which is not on this machine "
                           "(was the run copied away from its data?)")
    folds_path = run_dir / rundir.FOLDS
    if not folds_path.is_file():
        raise missing_error(f"{folds_path} does not exist, so which fold did not train on an image is unknown")
    assignment = read_folds(folds_path)
    data_cfg = DataConfig(num_classes=meta.num_classes, height=meta.input_height, width=meta.input_width,
                          class_names=tuple(meta.class_names))
    by_id = {s.image_id: s for s in load_samples(dirs, data_cfg)}
    wanted = set(fold_ids)
    eligible = sorted(k for k, f in assignment.items() if f != HOLDOUT and f in wanted)
    found = [k for k in eligible if k in by_id]
    if not found:
        raise missing_error(
            f"none of the {len(eligible)} training images of folds {sorted(wanted)} in {folds_path} is in "
            f"{', '.join(map(str, dirs))}: not the run's data?"
        )
    if len(found) < len(eligible):
        log.warning("%d of the %d training images of folds %s in %s are not in %s; the drift reference samples "
                    "the other %d", len(eligible) - len(found), len(eligible), sorted(wanted), folds_path,
                    ", ".join(map(str, dirs)), len(found))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(found), size=min(frames, len(found)), replace=False))
    ids = [found[i] for i in chosen]
    return [by_id[k] for k in ids], {k: assignment[k] for k in ids}, dirs


def _check_sizes(frames: int, bins: int, batch_size: int) -> None:
    if frames < 0 or 0 < frames < bins:
        raise ValueError(f"--drift-frames must be 0 (no drift reference) or at least {bins} (one per histogram "
                         f"bin), got {frames}")
    if batch_size < 1:
        raise ValueError(f"drift batch size must be >= 1, got {batch_size}")


def build_drift_reference(
    run_dir: str | Path,
    fold_ids: Sequence[int],
    folds: Sequence[nn.Module],
    meta: ModelMetadata,
    frames: int = DEFAULT_DRIFT_FRAMES,
    data_dirs: Sequence[str | Path] | None = None,
    bins: int | None = None,
    seed: int = DRIFT_SEED,
    batch_size: int = DRIFT_BATCH,
    device: str = "cpu",
) -> tuple[DriftReference | None, DriftSummary]:
    """The drift reference of a run's training frames and out-of-fold predicted areas.

    Each sampled frame (see :func:`drift_sample`) is read at the camera's resolution and predicted
    by ``InspectionModel([its fold's U-Net], meta)``, batched per fold; the frame statistics and the
    predicted pixel counts go to :func:`engine.drift.build_reference`.

    Args:
        run_dir: the training run.
        fold_ids, folds: the model's fold numbers and their U-Nets (returned to the CPU afterwards).
        meta: the exported model's metadata: thresholds, minimum areas, sizes, normalisation.
        frames: the most frames to sample; 0 builds nothing.
        data_dirs: the run's data folders when they are not where ``config.json`` says; given,
            a missing folder or split is an error instead of a warning.
        bins: histogram bins per statistic (default :data:`engine.drift.DEFAULT_BINS`).
        seed: seeds the sample.
        batch_size: frames per prediction batch.
        device: where the fold models predict (``cpu``, ``cuda``, ``cuda:N``, ``auto``).

    Returns:
        (the reference or None, how it was built or why not).

    Raises:
        FileNotFoundError: ``data_dirs`` given but unusable (see :func:`drift_sample`).
        ValueError: ``frames`` between 1 and ``bins - 1``, or bad training data.
    """
    bins = DEFAULT_BINS if bins is None else bins
    _check_sizes(frames, bins, batch_size)
    if frames == 0:
        return None, DriftSummary(skipped="--drift-frames 0")
    torch_device = devices.torch_device(parse_device(device, "--device"))
    started = time.perf_counter()
    try:
        samples, fold_of, dirs = drift_sample(run_dir, fold_ids, meta, frames, data_dirs, seed)
    except _NoDriftData as exc:
        log.warning("%s; export goes on without a drift reference (the server will not monitor drift): pass --data "
                    "DIR to point at the run's data, or --drift-frames 0 to say so", exc)
        return None, DriftSummary(skipped=str(exc))
    if len(samples) < bins:
        message = f"only {len(samples)} training images to sample, fewer than the {bins} histogram bins"
        log.warning("%s; export goes on without a drift reference", message)
        return None, DriftSummary(skipped=message, data=[str(d) for d in dirs])
    predicted = predict_out_of_fold(samples, fold_of, fold_ids, folds, meta, torch_device, batch_size)
    reference = build_reference(predicted.frames, np.concatenate(predicted.counts), bins=bins)
    summary = DriftSummary(frames=reference.frames, seconds=time.perf_counter() - started,
                           image_ids=predicted.image_ids, frames_per_fold=predicted.per_fold,
                           data=[str(d) for d in dirs])
    log.info("drift reference: %s", summary.summary())
    return reference, summary


@dataclass
class OutOfFold:
    """Frames read at the camera's resolution and each one's predicted pixel counts, batch by batch."""

    frames: list[np.ndarray] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    per_fold: dict[int, int] = field(default_factory=dict)


def predict_out_of_fold(
    samples: Sequence[Sample], fold_of: dict[str, int], fold_ids: Sequence[int], folds: Sequence[nn.Module],
    meta: ModelMetadata, torch_device: Any, batch_size: int = DRIFT_BATCH,
) -> OutOfFold:
    """Each sample predicted by ``InspectionModel([the U-Net of its fold], meta)``, batched per fold."""
    data_cfg = DataConfig(num_classes=meta.num_classes, height=meta.input_height, width=meta.input_width,
                          class_names=tuple(meta.class_names))
    # The frames are kept for build_reference (256 full-resolution frames are ~100 MB): reading the
    # JPEGs twice would cost more than holding them.
    out = OutOfFold()
    for index, k in enumerate(fold_ids):
        group = [s for s in samples if fold_of[s.image_id] == k]
        if not group:
            continue
        unet = folds[index]
        model = InspectionModel([unet], meta).eval().to(torch_device)
        try:
            for start in range(0, len(group), batch_size):
                chunk = group[start: start + batch_size]
                batch = np.stack([read_image(s.path, data_cfg) for s in chunk])
                with torch.inference_mode():
                    _, batch_counts, _ = model(torch.from_numpy(batch).to(torch_device))
                out.frames.append(batch)
                out.counts.append(batch_counts.cpu().numpy())
                out.image_ids += [s.image_id for s in chunk]
        finally:
            unet.to("cpu")  # the export traces the folds on the CPU
        out.per_fold[k] = len(group)
        log.info("drift reference: %d frames predicted by fold %d (out of fold)", len(group), k)
    return out
