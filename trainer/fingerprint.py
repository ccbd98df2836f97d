"""What ``trainer fit``'s planner (:mod:`trainer.plan`) reads before it chooses: the data's fingerprint
(frame size, frames, class frequencies, how thin each class's defects are) and the machine's (cores, CPU
features, CUDA).

A defect's width is the thickness of its thickest part: twice the largest distance from a pixel of the
component to the background, minus one (a 3-pixel-wide scratch at any angle measures 3, a 20-pixel pit
20). Per class the fingerprint keeps the 10th percentile of the widths weighted by the components'
areas: the width of the thinnest defects that hold a tenth of the class's defect pixels, which the
training scale must keep several pixels wide. Weighting by area keeps the specks around a crack (many
components, few pixels) from passing for the class's typical defect.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from engine.cpu import cpu_features, usable_cpus
from trainer.data import sample_masks
from trainer.samples import DataConfig, Sample

#: Frames with defects whose masks the fingerprint decodes at most (a seeded sample beyond it), so that
#: fingerprinting a large data set stays a matter of seconds.
MAX_MEASURED_FRAMES = 1000
#: Components a class needs before its width percentile counts as "common" (rarer classes are listed
#: but do not decide the scale).
MIN_COMPONENTS = 10
WIDTH_PERCENTILE = 10


@dataclass(frozen=True)
class ClassStats:
    """One class's statistics.

    Attributes:
        frames: frames holding the class.
        frequency: ``frames`` over all frames.
        pixel_fraction: defect pixels over all pixels of the measured frames.
        components: connected components measured (8-connectivity).
        width_p10: area-weighted 10th percentile of the components' widths in frame pixels (None: no component).
        extent_p90: 90th percentile of the components' longer bounding-box side in frame pixels.
    """

    frames: int
    frequency: float
    pixel_fraction: float
    components: int
    width_p10: float | None
    extent_p90: float | None


@dataclass(frozen=True)
class DataFingerprint:
    """The data as the planner sees it: frame size, frame count and per-class statistics."""

    height: int
    width: int
    frames: int
    measured_frames: int
    classes: tuple[ClassStats, ...]
    class_names: tuple[str, ...]

    def thinnest(self) -> tuple[int, float] | None:
        """(0-based class, width) of the common class whose small defects are thinnest; None when no
        class has :data:`MIN_COMPONENTS` components (then every class with a component counts)."""
        measured = [(k, c) for k, c in enumerate(self.classes) if c.width_p10 is not None]
        common = [(k, c) for k, c in measured if c.components >= MIN_COMPONENTS] or measured
        if not common:
            return None
        k, stats = min(common, key=lambda kc: kc[1].width_p10)
        return k, float(stats.width_p10)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MachineFingerprint:
    """The machine that trains: CPU cores and features, and the CUDA device when training on one."""

    cores: int
    cpu: str
    cpu_bf16: bool
    cuda: bool
    gpu: str | None = None
    gpu_memory_gib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def component_widths(mask: np.ndarray) -> np.ndarray:
    """float ``[N, 3]``: (width, area, longer bounding-box side) of each 8-connected component of a 0/1
    mask, in pixels."""
    # A zero border: a defect cut by the frame's edge is measured by what the frame shows of it.
    padded = np.pad(mask.astype(np.uint8), 1)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(padded, connectivity=8)
    if count <= 1:
        return np.zeros((0, 3))
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    inside = labels > 0
    label, value = labels[inside], distance[inside]
    order = np.lexsort((value, label))  # by label, then distance: each label's last entry is its maximum
    label, value = label[order], value[order]
    last = np.r_[np.nonzero(np.diff(label))[0], label.size - 1]
    inner = np.zeros(count)
    inner[label[last]] = value[last]
    extents = np.maximum(stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT])
    return np.stack([np.maximum(2 * inner[1:] - 1, 1.0), stats[1:, cv2.CC_STAT_AREA], extents], axis=1).astype(float)


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value with at least ``q`` percent of the total weight at or below it."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] * q / 100.0)])


def data_fingerprint(samples: Sequence[Sample], data_cfg: DataConfig, seed: int = 0) -> DataFingerprint:
    """Measures ``samples``: class frequencies from every frame's labels, widths and pixel fractions
    from the masks of at most :data:`MAX_MEASURED_FRAMES` frames with defects (a seeded sample)."""
    c = data_cfg.num_classes
    with_defects = [s for s in samples if s.labels]
    measured = with_defects if len(with_defects) <= MAX_MEASURED_FRAMES else \
        random.Random(seed).sample(with_defects, MAX_MEASURED_FRAMES)
    components: list[list[np.ndarray]] = [[] for _ in range(c)]
    for sample in measured:
        masks = sample_masks(sample, data_cfg)
        for k in sample.labels:
            components[k - 1].append(component_widths(masks[k - 1]))
    # Pixel fractions over every frame: the measured frames stand for all frames with defects.
    frames_px = max(len(measured), 1) * data_cfg.height * data_cfg.width * len(samples) / max(len(with_defects), 1)
    counts = [sum(1 for s in samples if k + 1 in s.labels) for k in range(c)]
    classes = tuple(_class_stats(counts[k], len(samples), frames_px, components[k]) for k in range(c))
    return DataFingerprint(height=data_cfg.height, width=data_cfg.width, frames=len(samples),
                           measured_frames=len(measured), classes=classes, class_names=tuple(data_cfg.class_names))


def _class_stats(frames: int, total: int, frames_px: float, components: list[np.ndarray]) -> ClassStats:
    table = np.concatenate(components) if components else np.zeros((0, 3))
    width, area, extent = table.T
    return ClassStats(
        frames=frames, frequency=round(frames / max(total, 1), 4),
        pixel_fraction=round(float(area.sum() / frames_px), 6), components=len(table),
        width_p10=round(weighted_percentile(width, area, WIDTH_PERCENTILE), 1) if len(table) else None,
        extent_p90=round(float(np.percentile(extent, 90)), 1) if len(table) else None,
    )


def machine_fingerprint(cuda_device: int | None) -> MachineFingerprint:
    """This machine, training on the CUDA device of that index or (None) on its CPU."""
    features = cpu_features()
    cores = usable_cpus()
    gpu, memory = None, None
    if cuda_device is not None:
        import torch

        props = torch.cuda.get_device_properties(cuda_device)
        gpu, memory = props.name, round(props.total_memory / 2**30, 1)
    return MachineFingerprint(cores=cores, cpu=features.model, cpu_bf16=features.bf16, cuda=cuda_device is not None,
                              gpu=gpu, gpu_memory_gib=memory)
