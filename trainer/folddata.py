"""A fold's data on this process: the balanced training records, the datasets and their loaders,
and, for crop training, the crop sampler and the whole frames BatchNorm is re-estimated on.

Each frame is brought to the training size once (:class:`trainer.data.TrainingFrames`, with the
graph's own resize) and kept in memory; balancing copies and random augmentation act on the scaled
records. Under torchrun each process loads its :class:`~torch.utils.data.DistributedSampler` share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from trainer.augment_random import EpochSampler, RandomAugment
from trainer.balance import balance_plan, class_counts
from trainer.config import FitConfig
from trainer.crops import CropSampler
from trainer.data import TrainingFrames, loader_context
from trainer.distributed import Dist
from trainer.samples import Sample

#: Whole training frames the BatchNorm statistics of a crop-trained network are re-estimated on.
RECALIBRATION_FRAMES = 64


class FoldData:
    """Builds a fold's training and validation loaders for this process (see the module docstring).

    Attributes:
        items: the training records (samples, or ``(sample, transform)`` balancing copies).
        train_set: the training dataset (all records; the sampler picks this process's share).
        sampler, train_loader, val_loader: this process's share of each epoch.
        crops: the crop sampler (None without ``--crop``).
        recalibration: this process's share of the frames BatchNorm is re-estimated on after a crop epoch.
    """

    def __init__(self, cfg: FitConfig, d: Dist, fold: int, train_samples: Sequence[Sample],
                 val_samples: Sequence[Sample], workers: int, pin: bool) -> None:
        self.items = balance_plan(train_samples, cfg.frames.num_classes, cfg.balance_target, seed=cfg.seed + fold) \
            if cfg.balance else list(train_samples)
        self.crops: CropSampler | None = None
        self.recalibration: list[Sample] = []
        if cfg.crop is not None:
            rarity = np.argsort(class_counts(train_samples, cfg.frames.num_classes), kind="stable").tolist()
            self.crops = CropSampler(tuple(cfg.crop), rarity, cfg.seed, fold, defect_p=cfg.crop_defect_p)
            order = np.random.default_rng([cfg.seed, fold]).permutation(len(train_samples))
            picks = [train_samples[i] for i in order[:RECALIBRATION_FRAMES]]
            self.recalibration = picks[d.rank::d.world]
        augment = None if cfg.augment == "none" else RandomAugment(cfg.augment, cfg.seed, fold)
        size = tuple(cfg.train_size)
        self.train_set = TrainingFrames(self.items, cfg.frames, size, augment=augment)
        val_set = TrainingFrames(val_samples, cfg.frames, size)
        self.sampler = EpochSampler(self.train_set, num_replicas=d.world, rank=d.rank, shuffle=True,
                                    seed=cfg.seed + fold)
        self.train_loader = _loader(self.train_set, cfg.optim.batch_size, self.sampler, workers, pin)
        self.val_loader = _loader(Subset(val_set, range(d.rank, len(val_set), d.world)), cfg.optim.batch_size, None,
                                  workers, pin)


def _loader(dataset: Dataset, batch_size: int, sampler: Sampler | None, workers: int, pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0, drop_last=False, multiprocessing_context=loader_context(workers))
