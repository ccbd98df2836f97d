"""Crop training (``trainer fit --crop HxW``): random crops of each batch at the training scale.

A crop lets a network train at a resolution at which a whole frame would not fit the memory or
the time (the Severstal winners trained 256x1600 frames as 256x512 crops on 16 GB GPUs; a CPU
can afford a resolution at which a 5 px scratch is still visible). Validation, evaluation and
export run on whole frames: a U-Net or FPN is fully convolutional, so the trained weights apply
to any size.

Defect-aware sampling: with probability ``defect_p`` a crop is centred on a random pixel of the
rarest class present in its frame (rarest by training records of the fold), else placed
uniformly, so rare classes are not cropped away. Draws are seeded by ``(seed, fold, epoch,
batch)``: a resumed run crops as an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class CropSampler:
    """Crops ``(x [N, C, H, W], y [N, K, H, W])`` training batches to ``size``.

    Args:
        size: (height, width) of a crop, at most the training size.
        rarity: class indices, rarest first (a crop centres on the first one present).
        seed, fold: with the epoch and batch number, seed the draws.
        defect_p: probability of a defect-centred crop (``trainer fit --crop-defect-p``).
    """

    def __init__(self, size: tuple[int, int], rarity: Sequence[int], seed: int, fold: int,
                 defect_p: float) -> None:
        self.size, self.rarity = (int(size[0]), int(size[1])), [int(k) for k in rarity]
        self.seed, self.fold, self.defect_p = int(seed), int(fold), float(defect_p)

    def origins(self, y: Any, epoch: int, batch: int) -> list[tuple[int, int]]:
        """The (top, left) of each frame's crop."""
        ch, cw = self.size
        n, _, h, w = y.shape
        rng = np.random.default_rng([self.seed, self.fold, epoch, batch])
        present = y.flatten(2).amax(dim=2).bool().cpu().numpy()  # [N, K]
        out = []
        for i in range(n):
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            classes = [k for k in self.rarity if present[i, k]]
            if classes and rng.random() < self.defect_p:
                pixels = torch.nonzero(y[i, classes[0]])
                cy, cx = (int(v) for v in pixels[int(rng.integers(0, pixels.shape[0]))])
                top = min(max(cy - ch // 2, 0), h - ch)
                left = min(max(cx - cw // 2, 0), w - cw)
            out.append((top, left))
        return out

    def __call__(self, x: Any, y: Any, epoch: int, batch: int) -> tuple[Any, Any]:
        ch, cw = self.size
        if ch > x.shape[-2] or cw > x.shape[-1]:
            raise ValueError(f"--crop {ch}x{cw} is larger than the training size {tuple(x.shape[-2:])}")
        origins = self.origins(y, epoch, batch)
        xs = [x[i, :, t:t + ch, s:s + cw] for i, (t, s) in enumerate(origins)]
        ys = [y[i, :, t:t + ch, s:s + cw] for i, (t, s) in enumerate(origins)]
        return torch.stack(xs).contiguous(memory_format=_memory_format(x)), torch.stack(ys)


def _memory_format(x: Any) -> Any:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
