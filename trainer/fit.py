"""``trainer fit``'s orchestration: prepare the run directory, then train its folds, single process or DDP.

Per fold ``k`` the run directory gets ``fold{k}/best.pt`` (lowest validation loss),
``fold{k}/last.pt`` (the latest epoch plus optimiser, scheduler, early-stopping and RNG state),
``fold{k}/metrics.csv``, ``fold{k}/curves.png`` and ``fold{k}/config.json``. Re-running the same
command resumes every unfinished fold at the epoch after its ``last.pt``; finished folds are
skipped. The run directory's ``config.json`` pins the run's settings: a ``fit`` with different
ones refuses unless ``--restart`` says to start over.

Multi-GPU / multi-node: launch with ``torchrun --nproc-per-node N -m trainer.cli fit ...``.
Each process trains on its :class:`~torch.utils.data.DistributedSampler` share of every epoch
(``--batch-size`` is per process), validation statistics are summed over processes, and rank 0
alone writes files and logs. The gloo backend serves CPUs, NCCL GPUs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from network.checkpoint import FoldCheckpoint, read_fold_checkpoint
from trainer import rundir
from trainer.config import FitConfig, FitOptions
from trainer.data import load_samples
from trainer.distributed import Dist, barrier, on_main_then_share, setup_distributed, teardown
from trainer.loop import FoldTrainer
from trainer.report import write_report
from trainer.rundir import FoldPaths
from trainer.samples import Sample
from trainer.splits import HOLDOUT

log = logging.getLogger(__name__)


@dataclass
class EpochEnd:
    """What a per-epoch callback sees (on every rank)."""

    fold: int
    epoch: int
    row: dict[str, float]
    unet: nn.Module
    rank: int
    stopped: bool


@dataclass
class FoldOutcome:
    """How a fold's training ended.

    Attributes:
        stopped_early: patience ran out before the epoch limit (else it trained every epoch).
        budget_spent: ``--budget-min`` ended it (the schedule was fitted to the budget).
    """

    fold: int
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    seconds: float
    stopped_early: bool
    budget_spent: bool = False


def run_fit(
    cfg: FitConfig, options: FitOptions, on_epoch_end: Callable[[EpochEnd], None] | None = None,
    planned: dict[str, Any] | None = None,
) -> list[FoldOutcome]:
    """Trains the folds of a resolved config (every fold, or ``options.fold``); resumes unfinished ones.

    ``on_epoch_end`` is called on every rank after each epoch's files are written; an exception it
    raises stops training there (the next call resumes after that epoch). ``planned``: the planner's
    choices (:meth:`trainer.plan.Plan.to_dict`), recorded in a new run's ``config.json``.
    """
    if options.fold is not None and not 0 <= options.fold < cfg.folds:
        raise ValueError(f"--fold {options.fold} is out of range for --folds {cfg.folds} (0..{cfg.folds - 1})")
    started = time.monotonic()
    d = setup_distributed(options.device)
    try:
        samples = load_samples([Path(p) for p in cfg.data], cfg.frames)
        if not samples:
            raise ValueError(f"no images found in {', '.join(cfg.data)}")
        assignment = on_main_then_share(d, lambda: prepare_run(cfg, options, samples, planned))
        folds = list(range(cfg.folds)) if options.fold is None else [options.fold]
        outcomes = []
        for i, fold in enumerate(folds):
            # --budget-min: what is left of the budget, shared by the folds still to train.
            share = None if cfg.budget_min is None else \
                (cfg.budget_min * 60 - (time.monotonic() - started)) / (len(folds) - i)
            outcomes.append(train_fold(cfg, options, d, fold, samples, assignment, on_epoch_end, share))
        if d.main:
            with rundir.locked(options.out):
                write_report(Path(options.out))
        barrier(d)
        return outcomes
    finally:
        teardown(d)


def prepare_run(cfg: FitConfig, options: FitOptions, samples: Sequence[Sample],
                planned: dict[str, Any] | None = None) -> dict[str, int]:
    """Checks or writes ``RUN/config.json``, fixes the split in ``RUN/folds.csv``; returns it.

    Holds the run directory's lock throughout, so that ``fit --fold K`` processes started together
    on one run directory agree on one config and one split (the first writes them, the others read).
    """
    with rundir.locked(options.out):
        rundir.check_or_write_config(options.out, cfg, options.restart, planned)
        return rundir.fix_split(options.out, cfg, samples)


def split_fold(samples: Sequence[Sample], assignment: dict[str, int], fold: int) -> tuple[list[Sample], list[Sample]]:
    """(training, validation) samples of ``fold``: the holdout is in neither.

    Raises:
        ValueError: either side is empty.
    """
    train = [s for s in samples if assignment[s.image_id] not in (fold, HOLDOUT)]
    val = [s for s in samples if assignment[s.image_id] == fold]
    if not train or not val:
        raise ValueError(f"fold {fold} has {len(train)} training and {len(val)} validation images; "
                         "the data is too small for this many folds")
    return train, val


def read_resume(paths: FoldPaths) -> tuple[FoldCheckpoint, rundir.TrainingState] | None:
    """The fold's ``last.pt`` and its training state, or None when the fold has not started."""
    if not paths.last.exists():
        return None
    checkpoint = read_fold_checkpoint(paths.last)
    return checkpoint, rundir.TrainingState.from_dict(checkpoint.training, source=str(paths.last))


def train_fold(
    cfg: FitConfig,
    options: FitOptions,
    d: Dist,
    fold: int,
    samples: Sequence[Sample],
    assignment: dict[str, int],
    on_epoch_end: Callable[[EpochEnd], None] | None = None,
    budget_s: float | None = None,
) -> FoldOutcome:
    """Trains (or resumes, or skips when finished) one fold; see the module docstring.

    ``budget_s``: the fold's wall-clock seconds (``--budget-min``), counted from this call; the schedule
    is fitted to the epochs they hold (:class:`trainer.budget.EpochBudget`).
    """
    started = time.monotonic()
    paths = FoldPaths.of(options.out, fold)
    train_samples, val_samples = split_fold(samples, assignment, fold)
    resume = read_resume(paths)
    if resume is not None and resume[1].finished:
        checkpoint, state = resume
        if d.main:
            log.info("fold %d: finished earlier (best epoch %d), skipping", fold, state.best_epoch)
        short = checkpoint.facts.epoch < cfg.optim.epochs
        return FoldOutcome(fold, state.best_epoch, state.best_val_loss, checkpoint.facts.epoch, state.seconds,
                           stopped_early=short and state.budget is None, budget_spent=short and state.budget is not None)
    trainer = FoldTrainer(cfg, options, d, fold, paths, train_samples, val_samples, fresh=resume is None)
    if budget_s is not None:
        trainer.set_budget(budget_s, None if resume is None else resume[1].budget)
    if resume is not None:
        trainer.restore(*resume)
    elif d.main:
        trainer.clear_stale()
    trainer.make_loaders()
    if trainer.budget is not None:
        trainer.budget.seconds -= time.monotonic() - started  # the set-up (model, records) came out of it
    epoch, finished = trainer.start_epoch - 1, False
    while not finished and epoch < trainer.schedule_epochs:
        epoch += 1
        row, finished = trainer.run_epoch(epoch)
        barrier(d)
        if on_epoch_end is not None:
            on_epoch_end(EpochEnd(fold=fold, epoch=epoch, row=row, unet=trainer.unet, rank=d.rank, stopped=finished))
        if trainer.stopping.stop:
            if d.main:
                log.info("fold %d: early stop after epoch %d (no better validation loss for %d epochs; best epoch %d)",
                         fold, epoch, cfg.optim.patience, trainer.stopping.best_epoch)
            break
    stopping = trainer.stopping
    budget_spent = trainer.budget is not None and not stopping.stop and epoch < cfg.optim.epochs
    if budget_spent and d.main:
        log.info("fold %d: the budget ends it after epoch %d (%.1f min; best epoch %d)", fold, epoch,
                 trainer.seconds / 60, stopping.best_epoch)
    return FoldOutcome(fold, stopping.best_epoch, stopping.best_val_loss, epoch, trainer.seconds,
                       stopped_early=stopping.stop and epoch < trainer.schedule_epochs, budget_spent=budget_spent)
