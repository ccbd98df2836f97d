"""Training losses: BCE (the thesis) or BCE + soft Dice, with optional per-class positive weights.

All losses take raw logits ``[N, C, h, w]`` and 0/1 targets of the same shape and return a
scalar mean. Positive weights scale the loss of defect pixels per class (the winning Kaggle
solution weighted rare classes up); ``pos_weight`` ``[C]`` broadcasts over the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import LOSSES


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - Dice`` per class on sigmoid probabilities pooled over the batch, averaged over the classes
    that have defect pixels in the batch (0 when none has: BCE alone then).

    A class absent from a batch is left to the BCE. Scoring it too (Dice ``smooth / (sum p + smooth)``)
    pushes its probabilities down on every batch that lacks it, which for a rare class is nearly every
    batch, until the class is no longer predicted at all.
    """
    probs = torch.sigmoid(logits.float())
    target = target.float()
    dims = (0, 2, 3)
    intersection = (probs * target).sum(dims)
    truth = target.sum(dims)
    denominator = probs.sum(dims) + truth
    per_class = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
    present = (truth > 0).to(per_class.dtype)
    return (per_class * present).sum() / present.sum().clamp(min=1.0)


class SegmentationLoss(nn.Module):
    """``bce`` or ``bce+dice`` (equal weights) with optional per-class ``pos_weight``."""

    def __init__(self, kind: str = "bce", pos_weight: Sequence[float] | None = None) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
        self.kind = kind
        weight = None if pos_weight is None else torch.tensor([float(w) for w in pos_weight]).view(-1, 1, 1)
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.float()
        if self.pos_weight is not None and self.pos_weight.shape[0] != logits.shape[1]:
            raise ValueError(f"pos_weight has {self.pos_weight.shape[0]} entries but the model predicts "
                             f"{logits.shape[1]} classes")
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)
        if self.kind == "bce+dice":
            loss = loss + soft_dice_loss(logits, target)
        return loss


def logits_from_probs(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse sigmoid of clamped probabilities, to score an ensemble's mean probabilities with
    the same loss as the logits of one network (BCE of ``p`` clamped to ``[eps, 1 - eps]``)."""
    return torch.logit(probs.float(), eps=eps)
