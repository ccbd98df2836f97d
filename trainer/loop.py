"""One fold's training on this process: the model, optimiser and schedule, epochs, checkpoints.

:class:`FoldTrainer` runs in steps a test can call one by one (set-up, restore, loaders, one
training epoch, validation, save); :func:`trainer.fit.train_fold` strings them together. Beside it:
early stopping, the random state a resume restores, the learning-rate schedule, the autocast dtype
and the BatchNorm re-estimation after crop epochs. The network sees what the exported inspection
graph computes: the batch is normalised on the device by :func:`network.processing.scaled_input`, which
agrees with :func:`network.processing.preprocess` of the full frame to float rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.cli_util import progress_bar
from engine.cpu import cpu_autocast_dtype
from network.build import build_unet, probe_usage
from network.checkpoint import FoldCheckpoint, FoldFacts, read_fold_checkpoint, save_fold_checkpoint
from network.processing import network_stride, padded_logits, scaled_input
from trainer import rundir
from trainer.balance import class_counts
from trainer.budget import EpochBudget
from trainer.config import FitConfig, FitOptions
from trainer.curves import plot_curves
from trainer.distributed import Dist, all_reduce_sum, average_buffers, barrier, on_main_then_share
from trainer.folddata import FoldData
from trainer.losses import SegmentationLoss
from trainer.metrics import dice_from_sums
from trainer.pretrained import build_pretrained_unet
from trainer.priors import class_pixel_priors, init_output_prior
from trainer.rundir import FoldPaths, metrics_columns, read_metrics, write_metrics
from trainer.samples import Sample

log = logging.getLogger(__name__)


def build_model(cfg: FitConfig, pretrained: bool) -> nn.Module:
    """The fold's U-Net, with the configured encoder weights when ``pretrained``."""
    if not pretrained or cfg.encoder_weights == "none":
        return build_unet(cfg.network, encoder_weights=None)
    return build_pretrained_unet(cfg.network, cfg.encoder_weights)


@dataclass
class EarlyStopping:
    patience: int
    best_val_loss: float = float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, val_loss: float) -> bool:
        """Records an epoch; True when it is the best so far."""
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "patience"}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def disable_unused_parameters(unet: nn.Module, cfg: FitConfig) -> int:
    """Stops training the parameters the forward pass never reaches; returns the count of those it does.

    ``network.build.build_unet`` already drops the encoder stages smp builds beyond ``encoder_depth``;
    anything else left unreached and trainable would break DistributedDataParallel (it waits for
    their gradients) and inflate the parameter counts in the report.
    """
    _, reached, _, _ = probe_usage(unet, cfg.network.in_channels)
    used = 0
    for p in unet.parameters():
        if id(p) in reached:
            used += p.numel()
        else:
            p.requires_grad_(False)
    return used


def cosine_lr(base: float, epoch: int, step: int, steps: int, epochs: int) -> float:
    """``--lr-schedule cosine``: the learning rate of ``step`` (0-based, of ``steps``) in ``epoch`` (1-based).

    A linear warm-up from ``base / 10`` to ``base`` over the first epoch (Adam's moment estimates
    settle before the largest steps), then a cosine decay to 0 at the end of epoch ``epochs``. A
    function of the position alone, so a resumed run continues the schedule exactly; an early stop
    simply ends it sooner.
    """
    steps = max(int(steps), 1)
    if epochs > 1 and epoch == 1:
        return base * (0.1 + 0.9 * step / steps)
    warm = 1 if epochs > 1 else 0
    t = (epoch - 1 - warm + step / steps) / (epochs - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def amp_dtype(on_cuda: bool, amp: bool | None) -> torch.dtype | None:
    """The autocast dtype of ``--amp``: bf16 on CUDA where supported (else fp16), bf16 on a CPU with
    native bf16 (:func:`engine.cpu.supports_bf16`), None (fp32) otherwise. ``amp=None`` (the
    default) is on for CUDA and off on CPUs: bf16 training on the CPU has not yet matched fp32 on an
    independent set (``benchmarks/RESULTS.md``), so it is asked for, never assumed."""
    if amp is None:
        amp = on_cuda
    if not amp:
        return None
    if on_cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return cpu_autocast_dtype(amp)


class FoldTrainer:
    """One fold's training on this process, in steps a test can call one by one.

    ``__init__`` builds the U-Net (with output priors and freezing), optimiser, scheduler, grad
    scaler and loss; :meth:`restore` resumes from ``last.pt``; :meth:`make_loaders` builds the data
    loaders (and writes the fold's ``config.json``); :meth:`train_epoch` and :meth:`validate`
    return summed statistics; :meth:`save` writes an epoch's metrics, curves and checkpoints.
    """

    def __init__(self, cfg: FitConfig, options: FitOptions, d: Dist, fold: int, paths: FoldPaths,
                 train_samples: Sequence[Sample], val_samples: Sequence[Sample], fresh: bool = True) -> None:
        self.cfg, self.options, self.d, self.fold, self.paths = cfg, options, d, fold, paths
        self.train_samples, self.val_samples = list(train_samples), list(val_samples)
        torch.manual_seed(cfg.seed + fold)
        self.unet = build_model(cfg, pretrained=fresh and d.main)
        self.total_params = disable_unused_parameters(self.unet, cfg)
        if fresh and cfg.prior_init:
            priors = class_pixel_priors(self.train_samples, cfg.frames)
            init_output_prior(self.unet, priors)
            if d.main:
                log.info("fold %d: output bias set to the defect-pixel priors %s", fold, [f"{p:.2e}" for p in priors])
        if cfg.freeze_encoder:
            self.unet.encoder.requires_grad_(False)
        self.trainable_params = sum(p.numel() for p in self.unet.parameters() if p.requires_grad)
        self.stride = network_stride(self.unet)
        self.meta = cfg.metadata()
        self.on_cuda = d.device.type == "cuda"
        self.amp_dtype = amp_dtype(self.on_cuda, cfg.optim.amp)
        # channels_last where the convolutions run in reduced precision (CUDA, or bf16 on the CPU).
        self.memory_format = torch.channels_last if self.on_cuda or self.amp_dtype is not None \
            else torch.contiguous_format
        self.unet.to(d.device, memory_format=self.memory_format)
        self.optimizer = torch.optim.Adam([p for p in self.unet.parameters() if p.requires_grad], lr=cfg.optim.lr)
        self.scheduler = None
        if cfg.optim.lr_schedule == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, factor=0.5, patience=max(1, cfg.optim.patience // 3))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.criterion = SegmentationLoss(cfg.optim.loss, cfg.optim.pos_weight).to(d.device)
        self.stopping = EarlyStopping(cfg.optim.patience)
        self.start_epoch, self.seconds = 1, 0.0
        #: ``--budget-min``: the schedule's length fitted to the fold's budget (set by :meth:`set_budget`).
        self.budget: EpochBudget | None = None
        self.model: nn.Module = self.unet
        if d.main:
            paths.dir.mkdir(parents=True, exist_ok=True)
        barrier(d)

    @property
    def schedule_epochs(self) -> int:
        """The epoch the schedule (and the fold) ends with: ``--epochs``, or the budget's fitted length."""
        return self.cfg.optim.epochs if self.budget is None else self.budget.epochs

    def set_budget(self, seconds: float, state: dict[str, Any] | None = None) -> None:
        """Fits the schedule to ``seconds`` of epochs (a resumed fold continues its recorded fit)."""
        most = self.cfg.optim.epochs
        self.budget = EpochBudget(seconds, most) if state is None else EpochBudget.restored(state, seconds, most)

    # ------------------------------------------------------------------ resume

    def restore(self, checkpoint: FoldCheckpoint, state: rundir.TrainingState) -> None:
        """Resumes after ``last.pt``'s epoch: weights, optimiser, scheduler, scaler, early stopping, RNG."""
        self.unet.load_state_dict(checkpoint.state_dict)
        self.optimizer.load_state_dict(state.optimizer)
        if self.scheduler is not None and state.scheduler is not None:
            self.scheduler.load_state_dict(state.scheduler)
        if state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        self.stopping = EarlyStopping(self.cfg.optim.patience, **state.early_stopping)
        epoch = checkpoint.facts.epoch
        self.start_epoch, self.seconds = epoch + 1, float(state.seconds)
        set_rng_state(state.rng)
        if not self.d.main:
            return
        # Rows after the checkpoint come from an epoch that was cut short before last.pt: redone now.
        rows = [r for r in read_metrics(self.paths.metrics) if int(r["epoch"]) < self.start_epoch]
        write_metrics(self.paths.metrics, rows, metrics_columns(self.cfg.frames.num_classes))
        best = self.paths.best
        if self.stopping.best_epoch == epoch and (not best.exists() or read_fold_checkpoint(best).facts.epoch != epoch):
            # Interrupted between writing last.pt and best.pt: last.pt holds the best weights.
            save_fold_checkpoint(best, self.cfg.network, self.unet, checkpoint.facts)
        log.info("fold %d: resuming at epoch %d of %d (best so far: epoch %d)", self.fold, self.start_epoch,
                 self.schedule_epochs, self.stopping.best_epoch)

    def clear_stale(self) -> None:
        """A fresh fold: files a previous, restarted attempt left behind would mislead."""
        for stale in (self.paths.metrics, self.paths.best, self.paths.curves):
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------------ data

    def make_loaders(self) -> None:
        """Builds this process's share of the fold's data (:class:`trainer.folddata.FoldData`) and, on the
        main process, writes the fold's ``config.json``."""
        self.data = FoldData(self.cfg, self.d, self.fold, self.train_samples, self.val_samples, self.options.workers,
                             pin=self.on_cuda)
        if self.d.main:
            self._write_fold_config(self.data.items)
        if self.d.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[self.d.device.index] if self.on_cuda else None)

    def _write_fold_config(self, items: Sequence[Sample]) -> None:
        c = self.cfg.frames.num_classes
        before, after = class_counts(self.train_samples, c).tolist(), class_counts(items, c).tolist()
        log.info("fold %d: %d training records (%d images; per class %s -> %s), %d validation images, "
                 "%d parameters (%d trainable)", self.fold, len(items), len(self.train_samples), before, after,
                 len(self.val_samples), self.total_params, self.trainable_params)
        rundir.write_json(self.paths.config, {
            "fold": self.fold,
            "config": self.cfg.to_dict(),
            "options": dataclasses.asdict(self.options) | {"device": str(self.d.device), "world_size": self.d.world},
            "data": {"train_images": len(self.train_samples), "train_records": len(items),
                     "val_images": len(self.val_samples), "class_counts_before_balancing": before,
                     "class_counts_after_balancing": after},
            "model": {"params_total": self.total_params, "params_trainable": self.trainable_params},
        })

    def batches(self, loader):
        """Training-resolution frames (:class:`trainer.data.TrainingFrames`) and masks -> network input
        (normalised as the exported graph's :func:`network.processing.preprocess` does) and float targets."""
        for frames, masks in loader:
            frames = frames.to(self.d.device, non_blocking=True)
            masks = masks.to(self.d.device, non_blocking=True)
            x = scaled_input(frames, self.meta).contiguous(memory_format=self.memory_format)
            yield x, masks.to(torch.float32)

    # ------------------------------------------------------------------ one epoch

    def _autocast(self):
        return torch.autocast(self.d.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _new_sums(self):
        return torch.zeros(2 + 3 * self.cfg.frames.num_classes, device=self.d.device, dtype=torch.float64)

    def _accumulate(self, sums, loss, logits, y) -> None:
        """Adds a batch's loss and Dice sums: [loss * n, n, intersection (C), predicted (C), truth (C)]."""
        c = self.cfg.frames.num_classes
        p = torch.sigmoid(logits.detach().float())
        n = y.shape[0]
        sums[0] += loss.detach().float() * n
        sums[1] += n
        sums[2:2 + c] += (p * y).sum((0, 2, 3))
        sums[2 + c:2 + 2 * c] += p.sum((0, 2, 3))
        sums[2 + 2 * c:] += y.sum((0, 2, 3))

    def _loss(self, out, y):
        """(mask logits, loss): the segmentation loss, plus the gate head's BCE on presence labels."""
        # Losses and metrics in fp32, whatever the network ran in.
        if not isinstance(out, (tuple, list)):
            return out, self.criterion(out.float(), y)
        presence = y.flatten(2).amax(dim=2)
        return out[0], self.criterion(out[0].float(), y) + F.binary_cross_entropy_with_logits(out[1].float(), presence)

    def train_epoch(self, epoch: int):
        """One pass over the training loader; returns the summed statistics (this process's share)."""
        self.data.sampler.set_epoch(epoch)
        self.model.train()
        if self.cfg.freeze_encoder:
            self.unet.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics too (as Keras does)
        sums = self._new_sums()
        bar = progress_bar(self.batches(self.data.train_loader), total=len(self.data.train_loader),
                           desc=f"fold {self.fold} epoch {epoch}/{self.schedule_epochs}", leave=False,
                           dynamic_ncols=True, show=self.options.progress if self.d.main else False)
        steps = len(self.data.train_loader)
        for step, (x, y) in enumerate(bar):
            if self.data.crops is not None:
                x, y = self.data.crops(x, y, epoch, step)
            if self.cfg.optim.lr_schedule == "cosine":
                for group in self.optimizer.param_groups:
                    group["lr"] = cosine_lr(self.cfg.optim.lr, epoch, step, steps, self.schedule_epochs)
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                out = padded_logits(self.model, x, tuple(x.shape[-2:]), self.stride)
            logits, loss = self._loss(out, y)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._accumulate(sums, loss, logits, y)
            bar.set_postfix(loss=f"{(sums[0] / sums[1]).item():.4f}")
        bar.close()
        if self.data.crops is not None:
            self.recalibrate_batchnorm()
        if self.d.distributed:
            average_buffers(self.unet, self.d.world)
        return sums

    def recalibrate_batchnorm(self) -> None:
        """Crop training: the BatchNorm running statistics re-estimated on whole training frames.

        A crop-trained network's statistics come from its last batches of crops, mostly centred on
        defects; on whole, mostly defect-free frames they shift the activations enough to flood the
        masks. Resets every BatchNorm layer being trained (a frozen encoder's are not) and averages
        its statistics over :data:`trainer.folddata.RECALIBRATION_FRAMES` whole training frames,
        unaugmented and without gradients, as validation, export and serving see frames.
        """
        layers = [m for m in self.unet.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
        if not layers or not self.data.recalibration:
            return
        momenta = [m.momentum for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        step = self.cfg.optim.batch_size
        with torch.no_grad():
            for i in range(0, len(self.data.recalibration), step):
                frames = torch.stack([self.data.train_set.scaled(s)[0] for s in self.data.recalibration[i:i + step]])
                x = scaled_input(frames.to(self.d.device), self.meta).contiguous(memory_format=self.memory_format)
                # fp32 whatever --amp says: the statistics must describe the activations the exported
                # fp32 graph computes.
                padded_logits(self.unet, x, self.cfg.train_size, self.stride)
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum

    def validate(self):
        """The validation loader's summed statistics (this process's share)."""
        self.model.eval()
        sums = self._new_sums()
        with torch.no_grad():
            for x, y in self.batches(self.data.val_loader):
                with self._autocast():
                    out = padded_logits(self.unet, x, self.cfg.train_size, self.stride)
                logits, loss = self._loss(out, y)
                self._accumulate(sums, loss, logits, y)
        return sums

    def summarise(self, sums) -> tuple[float, float, list[float]]:
        """(mean loss, overall Dice, per-class Dice) over every process's sums."""
        c = self.cfg.frames.num_classes
        s = all_reduce_sum(self.d, sums).cpu().double().numpy()
        inter, pred, truth = s[2:2 + c], s[2 + c:2 + 2 * c], s[2 + 2 * c:]
        overall = float(dice_from_sums(inter.sum(), pred.sum(), truth.sum()))
        return float(s[0] / max(s[1], 1.0)), overall, [float(v) for v in dice_from_sums(inter, pred, truth)]

    def run_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """Trains, validates and saves one epoch; returns its metrics row and whether the fold is done."""
        started = time.perf_counter()
        train_loss, train_dice, train_dice_c = self.summarise(self.train_epoch(epoch))
        val_loss, val_dice, val_dice_c = self.summarise(self.validate())
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step(val_loss)
        improved = self.stopping.update(epoch, val_loss)
        epoch_s = time.perf_counter() - started
        self.seconds += epoch_s
        budget, budget_spent = self.budget, False
        if budget is not None:
            # Rank 0's clock decides for every rank: the schedule's length sets every rank's learning rate.
            self.budget, budget_spent = on_main_then_share(
                self.d, lambda: (budget, budget.record(epoch, epoch_s, self.seconds)))
        row: dict[str, float] = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                                 "train_dice": train_dice, "val_dice": val_dice}
        row.update({f"train_dice_{k + 1}": v for k, v in enumerate(train_dice_c)})
        row.update({f"val_dice_{k + 1}": v for k, v in enumerate(val_dice_c)})
        row.update({"lr": lr, "seconds": round(time.perf_counter() - started, 3)})
        finished = self.stopping.stop or epoch >= self.schedule_epochs or budget_spent
        if self.d.main:
            self.save(epoch, row, improved, finished)
            log.info("fold %d epoch %d/%d: train loss %.4f Dice %.4f | val loss %.4f Dice %.4f%s | %.1fs", self.fold,
                     epoch, self.schedule_epochs, train_loss, train_dice, val_loss, val_dice, " *" if improved else "",
                     row["seconds"])
        return row, finished

    # ------------------------------------------------------------------ saving

    def facts(self, row: dict[str, float]) -> FoldFacts:
        cfg = self.cfg
        return FoldFacts(
            fold=self.fold, epoch=int(row["epoch"]), val_loss=row["val_loss"], val_dice=row["val_dice"],
            train_loss=row["train_loss"], train_dice=row["train_dice"], input_size=cfg.frames.size,
            train_size=cfg.train_size, class_names=tuple(cfg.frames.class_names), mean=cfg.mean, std=cfg.std,
            encoder_weights=cfg.encoder_weights, params_total=self.total_params,
            params_trainable=self.trainable_params,
        )

    def training_state(self, finished: bool) -> rundir.TrainingState:
        return rundir.TrainingState(
            optimizer=self.optimizer.state_dict(),
            scheduler=None if self.scheduler is None else self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            early_stopping=self.stopping.state(), rng=rng_state(), seconds=self.seconds, finished=finished,
            best_epoch=self.stopping.best_epoch, best_val_loss=self.stopping.best_val_loss,
            budget=None if self.budget is None else self.budget.state(),
        )

    def save(self, epoch: int, row: dict[str, float], improved: bool, finished: bool) -> None:
        """Writes the epoch's metrics row and curves, then ``last.pt``, then (when improved) ``best.pt``.

        The order matters for resuming (see :meth:`restore`).
        """
        rows = read_metrics(self.paths.metrics) + [row]
        write_metrics(self.paths.metrics, rows, metrics_columns(self.cfg.frames.num_classes))
        network = self.cfg.network
        plot_curves(rows, self.paths.curves, title=f"fold {self.fold}: {network.encoder} {network.arch}")
        facts = self.facts(row)
        ucfg = self.cfg.network
        save_fold_checkpoint(self.paths.last, ucfg, self.unet, facts, self.training_state(finished).to_dict())
        if improved:
            save_fold_checkpoint(self.paths.best, ucfg, self.unet, facts)

