"""The segmentation head's prior initialisation (``--prior-init``, as in RetinaNet): its bias starts
at each class's defect-pixel fraction, so early epochs do not go into learning that ~99 % of pixels
are background."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from trainer.data import DataConfig, sample_masks
from trainer.samples import Sample


def class_pixel_priors(samples: Sequence[Sample], data_cfg: DataConfig, floor: float = 1e-4) -> list[float]:
    """Fraction of defect pixels per class over ``samples`` (decoded by the project's RLE), clipped
    to ``[floor, 0.5]`` so a class absent from the fold still gets a finite, small bias."""
    c = data_cfg.num_classes
    pixels = np.zeros(c, dtype=np.int64)
    for sample in samples:
        if sample.labels:
            pixels += sample_masks(sample, data_cfg).reshape(c, -1).sum(axis=1, dtype=np.int64)
    fraction = pixels / max(1, len(samples) * data_cfg.height * data_cfg.width)
    return [float(v) for v in np.clip(fraction, floor, 0.5)]


def init_output_prior(unet: nn.Module, priors: Sequence[float]) -> None:
    """Sets the segmentation head's bias to ``logit(prior)`` per class."""
    head = unet.segmentation_head[0]
    if not isinstance(head, torch.nn.Conv2d) or head.bias is None or head.bias.numel() != len(priors):
        raise ValueError(f"cannot set the output prior: unexpected segmentation head {head}")
    with torch.no_grad():
        head.bias.copy_(torch.tensor([math.log(p / (1 - p)) for p in priors]))
