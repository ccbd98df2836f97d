"""The default bench model's weights, fitted briefly to synthetic strips (see :mod:`benchmarks.models` for why).

Its own module because its source is part of the bench model's cache key: a change here rebuilds the model.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from engine.metadata import DEFAULT_CLASS_NAMES

log = logging.getLogger(__name__)

#: Crops a step.
FIT_BATCH = 8
#: AdamW's learning rate at the start of the cosine schedule.
FIT_LR = 1e-3


def fit_unet(unet: Any, steps: int, frame_size: tuple[int, int], train_size: tuple[int, int], seed: int) -> None:
    """Trains ``unet`` in place for ``steps`` steps on synthetic strips (``trainer.synth.draw_frame``) at
    the camera's frame size, brought to the U-Net's input size by the graph's own resize (masks: a quarter of a
    cell's pixels on), on crops a third of its width (a step costs a third of a whole frame's): AdamW, cosine
    learning rate, BCE + Dice (``trainer.losses``), fp32. Leaves it in eval mode.
    """
    import numpy as np
    import torch

    from network.processing import resize
    from trainer.losses import SegmentationLoss
    from trainer.synth import draw_frame

    rng = np.random.default_rng(seed)
    classes = len(DEFAULT_CLASS_NAMES)
    crop = max(1, train_size[1] // 3)
    loss_fn = SegmentationLoss("bce+dice")
    optimiser = torch.optim.AdamW(unet.parameters(), lr=FIT_LR, weight_decay=1e-4)
    log.info("fitting the bench U-Net (%d steps of %d crops %dx%d on synthetic strips)", steps, FIT_BATCH,
             train_size[0], crop)
    unet.train()
    for step in range(steps):
        drawn = [draw_frame(rng, *frame_size,
                            tuple(sorted(rng.choice(classes, size=int(rng.integers(1, 3)), replace=False).tolist())),
                            classes) for _ in range(FIT_BATCH)]
        with torch.no_grad():  # the bench model's mean 0 and std 1: the network sees the frame / 255
            frames = torch.from_numpy(np.stack([i for i, _ in drawn])[:, None].astype(np.float32) / 255.0)
            images = resize(frames, train_size)
            masks = (resize(torch.from_numpy(np.stack([m for _, m in drawn]).astype(np.float32)), train_size) > 0.25)
        x0 = int(rng.integers(0, train_size[1] - crop + 1))
        for group in optimiser.param_groups:
            group["lr"] = FIT_LR * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        loss = loss_fn(unet(images[..., x0:x0 + crop]), masks[..., x0:x0 + crop].float())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log.info("fitting the bench U-Net: step %d of %d, loss %.3f", step + 1, steps, loss.item())
    unet.eval()


__all__ = ["FIT_BATCH", "FIT_LR", "fit_unet"]
