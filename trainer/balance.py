"""Class balancing for training folds (thesis section 5.1.1): oversample rare classes, flipped and rotated.

:func:`balance_plan` lists every training image once, untransformed, plus transformed copies of
images holding rare classes until each class appears in about ``target`` records. The dataset
applies the named transform (:func:`apply_transform`) to image and masks together, at the
training resolution (:class:`trainer.data.TrainingFrames`), with torchvision's v2 functional ops on ``tv_tensors`` (masks always resampled
nearest-neighbour, so they stay 0/1 and classes stay disjoint).

Validation folds and the holdout are never balanced: their class mix is the line's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from trainer.samples import Sample, label_matrix

log = logging.getLogger(__name__)

# Flips, 180 degrees, and +-10 degrees: the thesis' set. Names are stable (they are written to logs).
TRANSFORMS: tuple[str, ...] = ("hflip", "vflip", "rot180", "rot+10", "rot-10")
_ROTATIONS = {"rot+10": 10.0, "rot-10": -10.0}

Item = Union["Sample", tuple["Sample", Union[str, None]]]


def _records(items: Sequence[Item]) -> list[Sample]:
    return [item if isinstance(item, Sample) else item[0] for item in items]


def class_counts(items: Sequence[Item], num_classes: int) -> np.ndarray:
    """Records per class (int64 ``[C]``): how many items hold a defect of class k+1.

    ``items`` are samples or ``(sample, transform)`` pairs; a transformed copy counts as a record.
    """
    return label_matrix(_records(items), num_classes).sum(axis=0).astype(np.int64)


def balance_plan(
    samples: Sequence[Sample], num_classes: int, target: int | None = None, seed: int = 0
) -> list[tuple[Sample, str | None]]:
    """Training records: each sample once (transform ``None``) plus transformed copies of rare-class images.

    Classes are topped up rarest first. A class short of ``target`` records gets copies of the
    images holding it, round-robin over a seeded shuffle so every such image is used before any
    is used twice; images whose other classes are already at the target come last, so topping up
    one class inflates the others as little as possible. Each copy of an image gets the next
    transform in :data:`TRANSFORMS`, from a seeded starting point per image, so repeated copies differ.

    A record counts for every class its image holds; a +-10 degree rotation can turn part of a
    defect near the frame's ends out of view (the thesis' augmentation has the same property).

    Args:
        samples: the training fold's samples (never validation or holdout).
        num_classes: C.
        target: records wanted per class; default: the most frequent class's count.
        seed: makes the plan deterministic.

    Returns:
        ``(sample, transform name or None)`` records: the originals in input order, then the copies.
    """
    labels = label_matrix(samples, num_classes)
    counts = labels.sum(axis=0).astype(np.int64)
    if target is None:
        target = int(counts.max()) if len(samples) else 0
    if target < 0:
        raise ValueError(f"balancing target must be >= 0, got {target}")
    rng = np.random.default_rng(seed)
    copies_made = np.zeros(len(samples), dtype=np.int64)
    first_transform = rng.integers(0, len(TRANSFORMS), size=len(samples))
    plan: list[tuple[Sample, str | None]] = [(s, None) for s in samples]
    for k in np.argsort(counts, kind="stable"):
        if counts[k] >= target or counts[k] == 0:
            continue
        holders = np.flatnonzero(labels[:, k])
        holders = holders[rng.permutation(len(holders))]
        others = np.delete(labels[holders], k, axis=1)
        saturated = (others & (np.delete(counts, k) >= target)).any(axis=1)
        pool = holders[np.argsort(saturated, kind="stable")]
        needed = int(target - counts[k])
        chosen = pool[np.arange(needed) % len(pool)]
        for i in chosen.tolist():
            name = TRANSFORMS[(first_transform[i] + copies_made[i]) % len(TRANSFORMS)]
            copies_made[i] += 1
            plan.append((samples[i], name))
        # Each copy also adds a record to every other class its image holds.
        counts += labels[chosen].sum(axis=0)
    log.debug("balanced %d records into %d (target %d per class)", len(samples), len(plan), target)
    return plan


def _rotation_padding(height: int, width: int, degrees: float) -> tuple[int, int]:
    """Border (x, y) that every pixel of a rotated ``height x width`` frame samples from."""
    theta = math.radians(abs(degrees))
    c, s = math.cos(theta), math.sin(theta)
    pad_x = math.ceil(width / 2 * c + height / 2 * s - width / 2) + 1
    pad_y = math.ceil(width / 2 * s + height / 2 * c - height / 2) + 1
    return max(pad_x, 0), max(pad_y, 0)


def _reflect_pad(x: torch.Tensor, pad_x: int, pad_y: int) -> torch.Tensor:
    # Reflection padding is limited to less than the tensor's size per step; wide frames rotated
    # by 10 degrees can need more vertical border than that, so pad in steps.
    while pad_x > 0 or pad_y > 0:
        step_x = min(pad_x, x.shape[-1] - 1)
        step_y = min(pad_y, x.shape[-2] - 1)
        x = F.pad(x, [step_x, step_y], padding_mode="reflect")
        pad_x -= step_x
        pad_y -= step_y
    return x


def _rotate(img: tv_tensors.Image, masks_t: torch.Tensor, degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An image and its masks rotated about the centre, the corners filled by reflection."""
    msk = tv_tensors.Mask(masks_t)
    h, w = img.shape[-2:]
    c = masks_t.shape[0]
    # Up to 8 class masks travel as the bits of one uint8 channel: nearest-neighbour sampling
    # copies whole source values, so the bits survive exactly (overlaps too), and padding and
    # resampling one channel instead of C is most of the cost of a rotation.
    packed = 0 < c <= 8 and masks_t.dtype == torch.uint8 and bool(masks_t.max() <= 1)
    if packed:
        bits = torch.tensor([1 << k for k in range(c)], dtype=torch.uint8).view(c, 1, 1)
        msk = tv_tensors.Mask((masks_t * bits).sum(dim=0, keepdim=True, dtype=torch.uint8))
    pad_x, pad_y = _rotation_padding(h, w, degrees)
    img = _reflect_pad(img, pad_x, pad_y)
    msk = _reflect_pad(msk, pad_x, pad_y)
    img = F.rotate(img, degrees, interpolation=F.InterpolationMode.BILINEAR)
    msk = F.rotate(msk, degrees)
    img, msk = F.center_crop(img, [h, w]), F.center_crop(msk, [h, w])
    if packed:
        msk = (msk.as_subclass(torch.Tensor) & bits).ne(0).to(torch.uint8)
    return img, msk


def apply_transform(image, masks, name: str | None):
    """Transforms an image ``[H, W]`` uint8 and its masks ``[C, H, W]`` uint8 together.

    Rotations by +-10 degrees rotate about the centre and keep the frame size; the corners that
    would come from outside the frame are filled by reflecting image and masks alike (rolled
    steel continues past the frame, and a black wedge would be an artefact the line never shows),
    so every defect pixel in the result is still labelled. Images are resampled bilinearly,
    masks nearest-neighbour.

    Args:
        image: numpy array or torch tensor ``[H, W]``.
        masks: numpy array or torch tensor ``[C, H, W]``.
        name: one of :data:`TRANSFORMS`, or ``None`` for no change.

    Returns:
        ``(image, masks)`` of the same kind (numpy or torch), shapes and dtypes as given.
    """
    if name is None:
        return image, masks
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")
    as_numpy = isinstance(image, np.ndarray)
    image_t = torch.as_tensor(image)
    masks_t = torch.as_tensor(masks)
    if image_t.ndim != 2 or masks_t.ndim != 3 or tuple(masks_t.shape[1:]) != tuple(image_t.shape):
        raise ValueError(
            f"apply_transform expects image [H, W] and masks [C, H, W] of the same H, W; got "
            f"{tuple(image_t.shape)} and {tuple(masks_t.shape)}"
        )
    img = tv_tensors.Image(image_t[None])
    msk = tv_tensors.Mask(masks_t)
    if name == "hflip":
        img, msk = F.horizontal_flip(img), F.horizontal_flip(msk)
    elif name == "vflip":
        img, msk = F.vertical_flip(img), F.vertical_flip(msk)
    elif name == "rot180":
        img, msk = F.rotate(img, 180.0), F.rotate(msk, 180.0)
    else:
        img, msk = _rotate(img, masks_t, _ROTATIONS[name])
    out_image = img.as_subclass(torch.Tensor)[0]
    out_masks = msk.as_subclass(torch.Tensor)
    if as_numpy:
        return out_image.numpy(), out_masks.numpy()
    return out_image, out_masks
