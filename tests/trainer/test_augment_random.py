"""Random augmentation (``trainer fit --augment``): image and masks move together, draws are seeded
per (seed, fold, epoch, record), photometric changes leave masks alone, blackout clears a class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.augment_random import POLICIES, AugmentPolicy, EpochSampler, RandomAugment, _augment


def _frame_with_defect() -> tuple[torch.Tensor, torch.Tensor]:
    """A textured 64x96 frame whose class-2 defect is a bright block: its mask marks exactly those pixels."""
    rng = np.random.default_rng(0)
    image = rng.integers(40, 120, (64, 96), dtype=np.uint8)
    masks = np.zeros((4, 64, 96), dtype=np.uint8)
    image[10:30, 20:50] = 250
    masks[1, 10:30, 20:50] = 1
    return torch.from_numpy(image), torch.from_numpy(masks)


def test_same_record_and_epoch_give_the_same_draw_and_epochs_differ() -> None:
    image, masks = _frame_with_defect()
    augment = RandomAugment("strong", seed=3, fold=1)
    a = augment(image, masks, index=5, epoch=2)
    b = augment(image, masks, index=5, epoch=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [augment(image, masks, index=5, epoch=e)[0] for e in range(3, 9)]
    assert any(not torch.equal(a[0], o) for o in others)
    assert not torch.equal(RandomAugment("strong", seed=4, fold=1)(image, masks, 5, 2)[0], a[0]) or \
        not torch.equal(RandomAugment("strong", seed=3, fold=0)(image, masks, 5, 2)[0], a[0])


@pytest.mark.parametrize("level", ["light", "strong"])
def test_masks_follow_the_image(level: str) -> None:
    """The defect block is the only bright region: wherever it lands, its mask lands with it."""
    image, masks = _frame_with_defect()
    no_blackout = AugmentPolicy(**{**POLICIES[level].__dict__, "blackout": 0.0})
    moved = 0
    for seed in range(12):
        out_image, out_masks = _augment(image, masks, no_blackout, torch.Generator().manual_seed(seed))
        assert out_image.shape == image.shape and out_image.dtype == torch.uint8
        assert out_masks.shape == masks.shape and out_masks.dtype == torch.uint8
        assert set(out_masks.unique().tolist()) <= {0, 1}
        assert out_masks[[0, 2, 3]].sum() == 0
        m = out_masks[1].bool()
        # Inside the mask the frame is far brighter than outside (photometric changes keep the order).
        assert out_image[m].float().mean() > out_image[~m].float().mean() + 60
        moved += not torch.equal(out_masks, masks)
    assert moved >= 6  # flips move the block most of the time


def test_blackout_clears_the_class_and_its_pixels() -> None:
    image, masks = _frame_with_defect()
    always = AugmentPolicy(hflip=0.0, vflip=0.0, blackout=1.0)
    out_image, out_masks = _augment(image, masks, always, torch.Generator().manual_seed(0))
    assert out_masks.sum() == 0
    assert (out_image[10:30, 20:50] == 0).all() and torch.equal(out_image[40:], image[40:])


def test_epoch_sampler_hands_the_epoch_to_each_index() -> None:
    sampler = EpochSampler(list(range(10)), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(4)
    pairs = list(sampler)
    assert sorted(i for i, _ in pairs) == list(range(10)) and {e for _, e in pairs} == {4}


def test_unknown_level_is_named() -> None:
    with pytest.raises(ValueError, match="--augment must be one of none, light, strong"):
        RandomAugment("medium")
