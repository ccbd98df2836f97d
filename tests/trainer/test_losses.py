"""Training losses: BCE, BCE + soft Dice, positive weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import SegmentationLoss, soft_dice_loss


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    target = torch.zeros(2, 4, 8, 8)
    target[0, 2, :4, :4] = 1  # only class 3 has defect pixels in this batch
    target[1, 3, 2:6, 2:6] = 1
    return logits, target


def test_dice_scores_only_the_classes_present_in_the_batch() -> None:
    logits, target = _batch()
    logits.requires_grad_(True)
    loss = soft_dice_loss(logits, target)
    p = torch.sigmoid(logits.detach())
    expected = []
    for k in (2, 3):
        inter, total = (p[:, k] * target[:, k]).sum(), p[:, k].sum() + target[:, k].sum()
        expected.append(1 - (2 * inter + 1) / (total + 1))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    loss.backward()
    # Absent classes get no Dice gradient (BCE alone pushes them down), present ones do.
    assert logits.grad[:, :2].abs().sum() == 0
    assert logits.grad[:, 2:].abs().sum() > 0


def test_dice_of_a_batch_without_defects_is_zero_and_bce_dice_is_then_bce() -> None:
    logits = torch.randn(3, 4, 8, 8)
    empty = torch.zeros_like(logits)
    assert soft_dice_loss(logits, empty).item() == 0.0
    both = SegmentationLoss("bce+dice")(logits, empty)
    assert both.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, empty).item())


def test_positive_weights_scale_defect_pixels_and_must_match_the_classes() -> None:
    logits, target = _batch()
    plain = SegmentationLoss("bce")(logits, target)
    weighted = SegmentationLoss("bce", pos_weight=[1, 1, 3, 3])(logits, target)
    assert weighted.item() > plain.item()
    with pytest.raises(ValueError, match="pos_weight has 2 entries"):
        SegmentationLoss("bce", pos_weight=[1, 2])(logits, target)
    with pytest.raises(ValueError, match="unknown loss"):
        SegmentationLoss("focal")
