"""Random augmentation on every training batch (``trainer fit --augment none|light|strong``).

Image and masks are transformed together at the training resolution
(:class:`trainer.data.TrainingFrames`: the frame already scaled, its image float in [0, 1]) with
torchvision.transforms.v2 on ``tv_tensors`` (geometric ops move both; masks are resampled
nearest-neighbour so they stay 0/1; photometric ops touch only the image):

- ``light``: horizontal and vertical flips, brightness and contrast;
- ``strong``: ``light`` plus a small shift and scale (the border reflected, as rolled steel goes on
  past the frame), gamma, and the Kaggle winners' "defect blackout": now and then one class's
  defect pixels are blacked out and its mask cleared, so the network sees that class's absence
  on an otherwise identical frame.

Every draw is seeded by ``(run seed, fold, epoch, record index)``: the same record gets the same
transform in the same epoch whichever worker loads it, in whatever order, so a resumed run
repeats an uninterrupted one exactly. :class:`EpochSampler` hands the epoch to the dataset with
each index (persistent loader workers never see a ``set_epoch`` made in the main process).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from trainer.balance import _reflect_pad
from trainer.config import AUGMENT_LEVELS as LEVELS


@dataclass(frozen=True)
class AugmentPolicy:
    """How strongly each random transform acts (probabilities and ranges)."""

    hflip: float = 0.5
    vflip: float = 0.5
    brightness: float = 0.0  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.0
    gamma: float = 0.0  # log-uniform in [exp(-g), exp(g)]
    shift: float = 0.0  # fraction of the side, each direction
    scale: float = 0.0  # zoom drawn from [1 - s, 1 + s]
    affine_p: float = 0.0
    blackout: float = 0.0  # probability, for a frame with defects


POLICIES: dict[str, AugmentPolicy] = {
    "light": AugmentPolicy(brightness=0.15, contrast=0.15),
    "strong": AugmentPolicy(brightness=0.25, contrast=0.25, gamma=0.25, shift=0.05, scale=0.1, affine_p=0.5,
                            blackout=0.1),
}


def policy(level: str) -> AugmentPolicy | None:
    """The policy of ``--augment level`` (None for ``none``)."""
    if level not in LEVELS:
        raise ValueError(f"--augment must be one of {', '.join(LEVELS)}, got {level!r}")
    return POLICIES.get(level)


def record_seed(seed: int, fold: int, epoch: int, index: int) -> int:
    """The seed of one record's transform in one epoch (independent of worker and order)."""
    return int(np.random.SeedSequence([seed, fold, epoch, index]).generate_state(1)[0])


class RandomAugment:
    """Callable ``(image [H, W] uint8, masks [C, H, W] uint8, index, epoch) -> (image, masks)``, same
    shapes and dtypes, drawn from :func:`record_seed` of the run's ``seed`` and ``fold``."""

    def __init__(self, level: str, seed: int = 0, fold: int = 0) -> None:
        found = policy(level)
        if found is None:
            raise ValueError("--augment none needs no RandomAugment")
        self.level, self.policy, self.seed, self.fold = level, found, int(seed), int(fold)

    def __call__(self, image: torch.Tensor, masks: torch.Tensor, index: int,
                 epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(record_seed(self.seed, self.fold, epoch, index))
        return _augment(image, masks, self.policy, generator)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _augment(image: torch.Tensor, masks: torch.Tensor, p: AugmentPolicy,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:

    draws = torch.rand(5, generator=generator).tolist()
    img, msk = tv_tensors.Image(image[None]), tv_tensors.Mask(masks)
    if draws[0] < p.hflip:
        img, msk = F.horizontal_flip(img), F.horizontal_flip(msk)
    if draws[1] < p.vflip:
        img, msk = F.vertical_flip(img), F.vertical_flip(msk)
    if draws[2] < p.affine_p:
        img, msk = _shift_scale(img, msk, p, generator)
    if p.brightness:
        img = F.adjust_brightness(img, _uniform(generator, 1 - p.brightness, 1 + p.brightness))
    if p.contrast:
        img = F.adjust_contrast(img, _uniform(generator, 1 - p.contrast, 1 + p.contrast))
    if p.gamma:
        img = F.adjust_gamma(img, math.exp(_uniform(generator, -p.gamma, p.gamma)))
    out_image, out_masks = img.as_subclass(torch.Tensor)[0], msk.as_subclass(torch.Tensor)
    if draws[3] < p.blackout:
        out_image, out_masks = _blackout(out_image, out_masks, draws[4])
    return out_image.contiguous(), out_masks.contiguous()


def _shift_scale(img: Any, msk: Any, p: AugmentPolicy, generator: torch.Generator) -> tuple[Any, Any]:
    """A small shift and zoom about the centre; the border reflected before, cropped after."""
    h, w = img.shape[-2:]
    zoom = _uniform(generator, 1 - p.scale, 1 + p.scale)
    dx = round(_uniform(generator, -p.shift, p.shift) * w)
    dy = round(_uniform(generator, -p.shift, p.shift) * h)
    # Enough border that a zoom-out and the shift never sample outside the padded frame.
    pad_x = math.ceil(w * max(0.0, 1 / zoom - 1) / 2) + abs(dx) + 1
    pad_y = math.ceil(h * max(0.0, 1 / zoom - 1) / 2) + abs(dy) + 1
    img, msk = _reflect_pad(img, pad_x, pad_y), _reflect_pad(msk, pad_x, pad_y)
    args = dict(angle=0.0, translate=[dx, dy], scale=zoom, shear=[0.0, 0.0])
    img = F.affine(img, interpolation=F.InterpolationMode.BILINEAR, **args)
    msk = F.affine(msk, interpolation=F.InterpolationMode.NEAREST, **args)
    return F.center_crop(img, [h, w]), F.center_crop(msk, [h, w])


def _blackout(image: torch.Tensor, masks: torch.Tensor, draw: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One present class (chosen by ``draw``): its pixels set to 0 and its mask cleared."""
    present = torch.nonzero(masks.flatten(1).any(dim=1)).flatten()
    if present.numel() == 0:
        return image, masks
    k = int(present[min(int(draw * present.numel()), present.numel() - 1)])
    image, masks = image.clone(), masks.clone()
    image[masks[k] != 0] = 0
    masks[k] = 0
    return image, masks


class EpochSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` yielding ``(index, epoch)`` pairs."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((i, epoch) for i in super().__iter__())
