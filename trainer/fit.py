"""``trainer fit``: k-fold U-Net training with early stopping, resumable, single process or DDP.

Per fold ``k`` the run directory gets ``fold{k}/best.pt`` (lowest validation loss),
``fold{k}/last.pt`` (the latest epoch plus optimiser, scheduler, early-stopping and RNG state),
``fold{k}/metrics.csv``, ``fold{k}/curves.png`` and ``fold{k}/config.json``. Re-running the same
command resumes every unfinished fold at the epoch after its ``last.pt``; finished folds are
skipped. The run directory's ``config.json`` pins the run's settings: a ``fit`` with different
ones refuses unless ``--restart`` says to start over.

The network sees what the exported inspection graph computes: :class:`trainer.data.TrainingFrames`
brings each frame to the training size once with the graph's own resize (and the masks with
:func:`engine.model.downscale_masks`), keeps it in memory, and the batch is normalised on the
device by :func:`engine.model.scaled_input`, which agrees with :func:`engine.model.preprocess` of
the full frame to float rounding. Balancing copies and random augmentation act on the scaled records.

Multi-GPU / multi-node: launch with ``torchrun --nproc-per-node N -m trainer.cli fit ...``.
Each process trains on its :class:`~torch.utils.data.DistributedSampler` share of every epoch
(``--batch-size`` is per process), validation statistics are summed over processes, and rank 0
alone writes files and logs. The gloo backend serves CPUs, NCCL GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.metadata import ARCHS, GATE_POOLING
from trainer import rundir
from trainer.config import (
    AUGMENT_LEVELS,
    DEVICES,
    ENCODER_WEIGHTS,
    LOSSES,
    LR_SCHEDULES,
    FitConfig,
    FitOptions,
    build,
    differences,
    read_config_file,
    resolve,
)
from trainer.crops import parse_crop
from trainer.distributed import Dist, barrier, on_main_then_share, setup_distributed, teardown
from trainer.pretrained import build_pretrained_unet, check_pretrained_reachable
from trainer.rundir import metrics_columns, read_metrics, write_metrics

if TYPE_CHECKING:
    from torch import nn

    from engine.checkpoint import FoldCheckpoint, FoldFacts
    from engine.metadata import ModelMetadata
    from trainer.data import DataConfig
    from trainer.samples import Sample

log = logging.getLogger(__name__)

#: Whole training frames the BatchNorm statistics of a crop-trained network are re-estimated on.
RECALIBRATION_FRAMES = 64

HELP = "train the k-fold U-Nets of a run (resumable; multi-GPU through torchrun)"
DESCRIPTION = __doc__.split("\n\n", 1)[0].split(": ", 1)[1]

__all__ = ["Dist", "check_pretrained_reachable", "metrics_columns", "read_metrics", "run_fit", "train_fold"]


# --------------------------------------------------------------------------- CLI


def _csv_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _csv_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # only flags actually given override the config file and the defaults
    d = FitConfig()
    g = parser.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="DIR", default=S,
                   help="Severstal-format folder (train_images/ + train.csv); repeat to train on several together")
    g.add_argument("--out", metavar="RUN", default=S, help="run directory (created; reused to resume)")
    g.add_argument("--config", metavar="FILE", default=None, help="YAML or JSON file of settings (flags override it)")
    g.add_argument("--classes", dest="num_classes", type=int, default=S, help=f"defect classes (default {d.num_classes})")
    g.add_argument("--height", type=int, default=S, help="frame height (default: the size most images have)")
    g.add_argument("--width", type=int, default=S, help="frame width (default: the size most images have)")
    g.add_argument("--scale", type=float, default=S, help=f"training resolution / frame resolution (default {d.scale})")
    g.add_argument("--folds", type=int, default=S, help=f"cross-validation folds (default {d.folds})")
    g.add_argument("--holdout", type=float, default=S,
                   help=f"holdout: fraction < 1 or number of images, kept out of every fold (default {d.holdout})")
    g.add_argument("--folds-file", default=S, metavar="CSV",
                   help="use this folds.csv (e.g. from 'trainer split'); default: make one for the run")
    g.add_argument("--balance", action=argparse.BooleanOptionalAction, default=S,
                   help="oversample rare classes in training folds with flips/rotations (default on)")
    g.add_argument("--augment", choices=AUGMENT_LEVELS, default=S,
                   help="random augmentation of every training batch: flips, brightness/contrast (light); plus "
                        "shift/scale, gamma, defect blackout (strong); default none")
    g.add_argument("--crop", type=parse_crop, default=S, metavar="HxW",
                   help="train on random HxW crops at the training scale, centred on a rare class's defect "
                        "pixels with probability --crop-defect-p; validation and export use whole frames "
                        "(default: whole frames)")
    g.add_argument("--crop-defect-p", type=float, default=S, metavar="P",
                   help=f"probability that a crop is centred on a defect of its frame's rarest class, else placed "
                        f"uniformly (default {d.crop_defect_p})")
    g.add_argument("--balance-target", type=int, default=S, help="records per class (default: the commonest's)")
    g.add_argument("--prior-init", action=argparse.BooleanOptionalAction, default=S,
                   help="start the output bias at each class's defect-pixel fraction (default on)")
    m = parser.add_argument_group("model")
    m.add_argument("--arch", choices=ARCHS, default=S,
                   help="segmentation network: smp U-Net or FPN (default unet; FPN: decoder-channels[0] is the "
                        "pyramid width, [1] the segmentation width)")
    m.add_argument("--gate", action=argparse.BooleanOptionalAction, default=S,
                   help="a classification head on the encoder trained on presence labels; in the graph a class "
                        "is present only when its head's probability also reaches the gate threshold (default off)")
    m.add_argument("--gate-pooling", choices=GATE_POOLING, default=S,
                   help=f"how the gate head pools the encoder's features over the frame: max (a defect counts the "
                        f"same in a crop and a whole frame) or avg (default {d.gate_pooling})")
    m.add_argument("--encoder", default=S, help=f"U-Net encoder (default {d.encoder})")
    m.add_argument("--encoder-weights", choices=ENCODER_WEIGHTS, default=S,
                   help=f"encoder initialisation (default {d.encoder_weights}; needs the internet once)")
    m.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=S,
                   help="train only the decoder (the thesis' setting with pretrained weights)")
    m.add_argument("--in-channels", type=int, default=S, help=f"network input channels (default {d.in_channels})")
    m.add_argument("--encoder-depth", type=int, default=S, help=f"encoder stages 1..5 (default {d.encoder_depth})")
    m.add_argument("--decoder-channels", type=_csv_ints, default=S, metavar="C1,C2,..",
                   help="decoder widths, one per encoder stage (default 256,128,64,32,16 cut to the depth)")
    m.add_argument("--mean", type=float, default=S, help="input normalisation mean after /255 (default per weights)")
    m.add_argument("--std", type=float, default=S, help="input normalisation std after /255 (default per weights)")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=S, help=f"maximum epochs per fold (default {d.epochs})")
    o.add_argument("--patience", type=int, default=S, help=f"early-stopping patience in epochs (default {d.patience})")
    o.add_argument("--batch-size", type=int, default=S, help=f"batch size per process (default {d.batch_size})")
    o.add_argument("--lr", type=float, default=S, help=f"Adam learning rate (default {d.lr})")
    o.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=S,
                   help="none; plateau: halve on a validation plateau; cosine: per-step cosine decay from --lr to 0 "
                        "over --epochs, after a linear warm-up over the first epoch")
    o.add_argument("--loss", choices=LOSSES, default=S, help=f"training loss (default {d.loss})")
    o.add_argument("--pos-weight", type=_csv_floats, default=S, metavar="W1,W2,..",
                   help="per-class weight of defect pixels in the BCE, e.g. 2,2,1,1.5")
    o.add_argument("--amp", action=argparse.BooleanOptionalAction, default=S,
                   help="mixed precision: bf16 autocast + channels_last on CUDA (fp16 where bf16 is not supported) "
                   "and on a CPU with native bf16 (AVX-512 BF16/AMX); losses and metrics stay fp32; default on")
    o.add_argument("--seed", type=int, default=S, help=f"seed for splits, balancing and training (default {d.seed})")
    x = parser.add_argument_group("execution")
    x.add_argument("--fold", type=int, default=S, help="train only this fold (0-based); default: every fold")
    x.add_argument("--device", choices=DEVICES, default=S, help="auto = CUDA when available (default)")
    x.add_argument("--workers", type=int, default=S, help="data-loader worker processes (default 2)")
    x.add_argument("--restart", action="store_true", default=S,
                   help="delete the run directory's checkpoints and results and start over")
    x.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")


def config_from_args(args: argparse.Namespace) -> tuple[FitConfig, FitOptions]:
    """Defaults < ``--config FILE`` < flags, resolved against the data."""
    file_config, file_options = read_config_file(args.config) if args.config else ({}, {})
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command", "debug")}
    cfg, options = build({**file_config, **file_options}, given)
    if not options.out:
        raise ValueError("no run directory: give --out RUN")
    return resolve(cfg), options


def run(args: argparse.Namespace) -> int:
    cfg, options = config_from_args(args)
    from trainer.imagecheck import check_training_images  # every image, before any training starts

    check_training_images([Path(d) for d in cfg.data], (cfg.height, cfg.width), progress=options.progress)
    try:
        outcomes = run_fit(cfg, options)
    except KeyboardInterrupt:
        log.warning("interrupted: run the same command again to resume from the last finished epoch")
        raise
    for o in outcomes:
        log.info("fold %d: best epoch %d, val loss %.4f, %d epochs, %.1f min%s", o.fold, o.best_epoch,
                 o.best_val_loss, o.epochs_run, o.seconds / 60, " (stopped early)" if o.stopped_early else "")
    return 0


# --------------------------------------------------------------------------- model and data settings


def build_model(cfg: FitConfig, pretrained: bool) -> nn.Module:
    """The fold's U-Net, with the configured encoder weights when ``pretrained``."""
    from engine.model import build_unet

    ucfg = unet_config(cfg)
    if not pretrained or cfg.encoder_weights == "none":
        return build_unet(ucfg, encoder_weights=None)
    return build_pretrained_unet(ucfg, cfg.encoder_weights)


def unet_config(cfg: FitConfig):
    from engine.model import UNetConfig

    return UNetConfig(
        encoder=cfg.encoder, in_channels=cfg.in_channels, num_classes=cfg.num_classes,
        encoder_depth=cfg.encoder_depth, decoder_channels=tuple(cfg.decoder_channels or ()), arch=cfg.arch,
        gate=cfg.gate, gate_pooling=cfg.gate_pooling,
    )


def data_config(cfg: FitConfig) -> DataConfig:
    from trainer.data import DataConfig

    return DataConfig(num_classes=cfg.num_classes, height=int(cfg.height), width=int(cfg.width),
                      class_names=tuple(cfg.class_names) if cfg.class_names else None)


def preprocessing_metadata(cfg: FitConfig) -> ModelMetadata:
    """The metadata :func:`engine.model.preprocess` needs, as the exported graph will carry it."""
    from engine.decision import default_min_areas, default_thresholds
    from engine.metadata import ModelMetadata

    th, tw = cfg.train_size
    c = cfg.num_classes
    return ModelMetadata(
        num_classes=c, class_names=list(cfg.class_names or []), input_height=int(cfg.height),
        input_width=int(cfg.width), train_height=th, train_width=tw, thresholds=default_thresholds(c), min_areas=default_min_areas(c),
        encoder=cfg.encoder, in_channels=cfg.in_channels, mean=float(cfg.mean), std=float(cfg.std),
    )


# --------------------------------------------------------------------------- run directory


def _remove_outputs(out: Path) -> None:
    for name in rundir.OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for fold_dir in rundir.fold_dirs(out).values():
        shutil.rmtree(fold_dir)


def prepare_run(cfg: FitConfig, options: FitOptions) -> dict[str, int]:
    """Checks or writes ``RUN/config.json``, fixes the split in ``RUN/folds.csv``; returns it.

    Holds the run directory's lock throughout, so that ``fit --fold K`` processes started together
    on one run directory agree on one config and one split (the first writes them, the others read).

    Raises:
        ValueError: the run directory holds a run with other settings (and no ``--restart``),
            or training outputs without a config.
    """
    out = Path(options.out)
    with rundir.locked(out):
        _check_or_write_config(out, cfg, options.restart)
        return _fix_split(out, cfg)


def _check_or_write_config(out: Path, cfg: FitConfig, restart: bool) -> None:
    config_path = out / rundir.CONFIG
    if restart:
        log.info("--restart: deleting the previous results in %s", out)
        _remove_outputs(out)
    elif config_path.exists():
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON ({exc}); use --restart to start the run over") from None
        changed = differences(saved, cfg)
        if changed:
            raise ValueError(
                f"{out} holds a run with other settings:\n  " + "\n  ".join(changed)
                + "\nuse --restart to delete its results and start over, or choose another --out"
            )
        return
    elif rundir.fold_dirs(out):
        raise ValueError(f"{out} has fold folders but no {rundir.CONFIG}; use --restart to start over there")
    _write_json(config_path, cfg.to_dict())


def _fix_split(out: Path, cfg: FitConfig) -> dict[str, int]:
    from trainer.data import load_samples
    from trainer.splits import load_or_make_folds

    samples = load_samples([Path(p) for p in cfg.data], data_config(cfg))
    if not samples:
        raise ValueError(f"no images found in {', '.join(cfg.data)}")
    run_folds = out / rundir.FOLDS
    source = run_folds if run_folds.exists() or cfg.folds_file is None else Path(cfg.folds_file)
    assignment = load_or_make_folds(source, samples, cfg.num_classes, cfg.folds, cfg.holdout_count_or_fraction,
                                    cfg.seed)
    if source != run_folds:
        rundir.atomic_write_text(run_folds, source.read_text(encoding="utf-8"))
    return assignment


def _write_json(path: Path, data: Any) -> None:
    rundir.atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- training


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
    """

    fold: int
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    seconds: float
    stopped_early: bool


@dataclass
class _EarlyStopping:
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


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def disable_unused_parameters(unet: nn.Module, cfg: FitConfig) -> int:
    """Stops training the parameters the forward pass never reaches; returns the count of those it does.

    ``engine.model.build_unet`` already drops the encoder stages smp builds beyond ``encoder_depth``;
    anything else left unreached and trainable would break DistributedDataParallel (it waits for
    their gradients) and inflate the parameter counts in the report.
    """
    from engine.model import probe_usage

    _, reached, _, _ = probe_usage(unet, cfg.in_channels)
    used = 0
    for p in unet.parameters():
        if id(p) in reached:
            used += p.numel()
        else:
            p.requires_grad_(False)
    return used


def class_pixel_priors(samples: Sequence[Sample], cfg: FitConfig, floor: float = 1e-4) -> list[float]:
    """Fraction of defect pixels per class over ``samples`` (decoded by the project's RLE), clipped
    to ``[floor, 0.5]`` so a class absent from the fold still gets a finite, small bias."""
    import numpy as np

    from trainer.data import sample_masks

    data_cfg = data_config(cfg)
    pixels = np.zeros(cfg.num_classes, dtype=np.int64)
    for sample in samples:
        if sample.labels:
            pixels += sample_masks(sample, data_cfg).reshape(cfg.num_classes, -1).sum(axis=1, dtype=np.int64)
    fraction = pixels / max(1, len(samples) * int(cfg.height) * int(cfg.width))
    return [float(v) for v in np.clip(fraction, floor, 0.5)]


def init_output_prior(unet: nn.Module, priors: Sequence[float]) -> None:
    """Sets the segmentation head's bias to ``logit(prior)`` per class (RetinaNet's prior initialisation)."""
    import math

    import torch

    head = unet.segmentation_head[0]
    if not isinstance(head, torch.nn.Conv2d) or head.bias is None or head.bias.numel() != len(priors):
        raise ValueError(f"cannot set the output prior: unexpected segmentation head {head}")
    with torch.no_grad():
        head.bias.copy_(torch.tensor([math.log(p / (1 - p)) for p in priors]))


def run_fit(
    cfg: FitConfig, options: FitOptions, on_epoch_end: Callable[[EpochEnd], None] | None = None
) -> list[FoldOutcome]:
    """Trains the folds of a resolved config (every fold, or ``options.fold``); resumes unfinished ones.

    ``on_epoch_end`` is called on every rank after each epoch's files are written; an exception it
    raises stops training there (the next call resumes after that epoch).
    """
    from trainer.data import load_samples
    from trainer.report import write_report
    from trainer.splits import read_folds

    if options.fold is not None and not 0 <= options.fold < cfg.folds:
        raise ValueError(f"--fold {options.fold} is out of range for --folds {cfg.folds} (0..{cfg.folds - 1})")
    d = setup_distributed(options.device)
    try:
        assignment = on_main_then_share(d, lambda: prepare_run(cfg, options))
        samples = load_samples([Path(p) for p in cfg.data], data_config(cfg))
        if not d.main:
            assignment = read_folds(Path(options.out) / rundir.FOLDS)
        folds = range(cfg.folds) if options.fold is None else [options.fold]
        outcomes = [train_fold(cfg, options, d, fold, samples, assignment, on_epoch_end) for fold in folds]
        if d.main:
            with rundir.locked(options.out):
                write_report(Path(options.out))
        barrier(d)
        return outcomes
    finally:
        teardown(d)


def _loader(dataset, batch_size: int, sampler, workers: int, pin: bool):
    from torch.utils.data import DataLoader

    from trainer.data import loader_context

    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0, drop_last=False, multiprocessing_context=loader_context(workers))


@dataclass(frozen=True)
class FoldPaths:
    """A fold's files in the run directory."""

    dir: Path
    best: Path
    last: Path
    metrics: Path
    curves: Path
    config: Path

    @classmethod
    def of(cls, run_dir: str | Path, fold: int) -> FoldPaths:
        d = rundir.fold_dir(run_dir, fold)
        return cls(d, d / rundir.BEST, d / rundir.LAST, d / rundir.METRICS, d / rundir.CURVES, d / rundir.FOLD_CONFIG)


def split_fold(samples: Sequence[Sample], assignment: dict[str, int], fold: int) -> tuple[list[Sample], list[Sample]]:
    """(training, validation) samples of ``fold``: the holdout is in neither.

    Raises:
        ValueError: either side is empty.
    """
    from trainer.splits import HOLDOUT

    train = [s for s in samples if assignment[s.image_id] not in (fold, HOLDOUT)]
    val = [s for s in samples if assignment[s.image_id] == fold]
    if not train or not val:
        raise ValueError(f"fold {fold} has {len(train)} training and {len(val)} validation images; "
                         "the data is too small for this many folds")
    return train, val


def read_resume(paths: FoldPaths) -> tuple[FoldCheckpoint, rundir.TrainingState] | None:
    """The fold's ``last.pt`` and its training state, or None when the fold has not started."""
    from engine.model import read_fold_checkpoint

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
) -> FoldOutcome:
    """Trains (or resumes, or skips when finished) one fold; see the module docstring."""
    paths = FoldPaths.of(options.out, fold)
    train_samples, val_samples = split_fold(samples, assignment, fold)
    resume = read_resume(paths)
    if resume is not None and resume[1].finished:
        checkpoint, state = resume
        if d.main:
            log.info("fold %d: finished earlier (best epoch %d), skipping", fold, state.best_epoch)
        return FoldOutcome(fold, state.best_epoch, state.best_val_loss, checkpoint.facts.epoch, state.seconds,
                           stopped_early=checkpoint.facts.epoch < cfg.epochs)
    trainer = FoldTrainer(cfg, options, d, fold, paths, train_samples, val_samples, fresh=resume is None)
    if resume is not None:
        trainer.restore(*resume)
    elif d.main:
        trainer.clear_stale()
    trainer.make_loaders()
    epoch = trainer.start_epoch - 1
    for epoch in range(trainer.start_epoch, cfg.epochs + 1):
        row, finished = trainer.run_epoch(epoch)
        barrier(d)
        if on_epoch_end is not None:
            on_epoch_end(EpochEnd(fold=fold, epoch=epoch, row=row, unet=trainer.unet, rank=d.rank, stopped=finished))
        if trainer.stopping.stop:
            if d.main:
                log.info("fold %d: early stop after epoch %d (no better validation loss for %d epochs; best epoch %d)",
                         fold, epoch, cfg.patience, trainer.stopping.best_epoch)
            break
    stopping = trainer.stopping
    return FoldOutcome(fold, stopping.best_epoch, stopping.best_val_loss, epoch, trainer.seconds,
                       stopped_early=stopping.stop and epoch < cfg.epochs)


class FoldTrainer:
    """One fold's training on this process, in steps a test can call one by one.

    ``__init__`` builds the U-Net (with output priors and freezing), optimiser, scheduler, grad
    scaler and loss; :meth:`restore` resumes from ``last.pt``; :meth:`make_loaders` builds the data
    loaders (and writes the fold's ``config.json``); :meth:`train_epoch` and :meth:`validate`
    return summed statistics; :meth:`save` writes an epoch's metrics, curves and checkpoints.
    """

    def __init__(self, cfg: FitConfig, options: FitOptions, d: Dist, fold: int, paths: FoldPaths,
                 train_samples: Sequence[Sample], val_samples: Sequence[Sample], fresh: bool = True) -> None:
        import torch

        from engine.model import network_stride
        from trainer.losses import SegmentationLoss

        self.cfg, self.options, self.d, self.fold, self.paths = cfg, options, d, fold, paths
        self.train_samples, self.val_samples = list(train_samples), list(val_samples)
        torch.manual_seed(cfg.seed + fold)
        self.unet = build_model(cfg, pretrained=fresh and d.main)
        self.total_params = disable_unused_parameters(self.unet, cfg)
        if fresh and cfg.prior_init:
            priors = class_pixel_priors(self.train_samples, cfg)
            init_output_prior(self.unet, priors)
            if d.main:
                log.info("fold %d: output bias set to the defect-pixel priors %s", fold, [f"{p:.2e}" for p in priors])
        if cfg.freeze_encoder:
            self.unet.encoder.requires_grad_(False)
        self.trainable_params = sum(p.numel() for p in self.unet.parameters() if p.requires_grad)
        self.stride = network_stride(self.unet)
        self.meta = preprocessing_metadata(cfg)
        self.on_cuda = d.device.type == "cuda"
        self.amp_dtype = _amp_dtype(torch, self.on_cuda, cfg.amp)
        # channels_last where the convolutions run in reduced precision (CUDA, or bf16 on the CPU).
        self.memory_format = torch.channels_last if self.on_cuda or self.amp_dtype is not None \
            else torch.contiguous_format
        self.unet.to(d.device, memory_format=self.memory_format)
        self.optimizer = torch.optim.Adam([p for p in self.unet.parameters() if p.requires_grad], lr=cfg.lr)
        self.scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=0.5, patience=max(1, cfg.patience // 3)) if cfg.lr_schedule == "plateau" else None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.criterion = SegmentationLoss(cfg.loss, cfg.pos_weight).to(d.device)
        self.stopping = _EarlyStopping(cfg.patience)
        self.start_epoch, self.seconds = 1, 0.0
        self.model: nn.Module = self.unet
        if d.main:
            paths.dir.mkdir(parents=True, exist_ok=True)
        barrier(d)

    # ------------------------------------------------------------------ resume

    def restore(self, checkpoint: FoldCheckpoint, state: rundir.TrainingState) -> None:
        """Resumes after ``last.pt``'s epoch: weights, optimiser, scheduler, scaler, early stopping, RNG."""
        from engine.model import read_fold_checkpoint, save_fold_checkpoint

        self.unet.load_state_dict(checkpoint.state_dict)
        self.optimizer.load_state_dict(state.optimizer)
        if self.scheduler is not None and state.scheduler is not None:
            self.scheduler.load_state_dict(state.scheduler)
        if state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        self.stopping = _EarlyStopping(self.cfg.patience, **state.early_stopping)
        epoch = checkpoint.facts.epoch
        self.start_epoch, self.seconds = epoch + 1, float(state.seconds)
        _set_rng_state(state.rng)
        if not self.d.main:
            return
        # Rows after the checkpoint come from an epoch that was cut short before last.pt: redone now.
        rows = [r for r in read_metrics(self.paths.metrics) if int(r["epoch"]) < self.start_epoch]
        write_metrics(self.paths.metrics, rows, metrics_columns(self.cfg.num_classes))
        best = self.paths.best
        if self.stopping.best_epoch == epoch and (not best.exists() or read_fold_checkpoint(best).facts.epoch != epoch):
            # Interrupted between writing last.pt and best.pt: last.pt holds the best weights.
            save_fold_checkpoint(best, unet_config(self.cfg), self.unet, checkpoint.facts)
        log.info("fold %d: resuming at epoch %d of %d (best so far: epoch %d)", self.fold, self.start_epoch,
                 self.cfg.epochs, self.stopping.best_epoch)

    def clear_stale(self) -> None:
        """A fresh fold: files a previous, restarted attempt left behind would mislead."""
        for stale in (self.paths.metrics, self.paths.best, self.paths.curves):
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------------ data

    def make_loaders(self) -> None:
        import numpy as np
        import torch
        from torch.utils.data import Subset

        from trainer.augment_random import EpochSampler, RandomAugment
        from trainer.balance import balance_plan
        from trainer.data import TrainingFrames

        cfg, d = self.cfg, self.d
        items = balance_plan(self.train_samples, cfg.num_classes, cfg.balance_target, seed=cfg.seed + self.fold) \
            if cfg.balance else list(self.train_samples)
        if d.main:
            self._write_fold_config(items)
        self.crops, self.recalibration = None, []
        if cfg.crop is not None:
            from trainer.balance import class_counts
            from trainer.crops import CropSampler

            rarity = np.argsort(class_counts(self.train_samples, cfg.num_classes), kind="stable").tolist()
            self.crops = CropSampler(tuple(cfg.crop), rarity, cfg.seed, self.fold, defect_p=cfg.crop_defect_p)
            order = np.random.default_rng([cfg.seed, self.fold]).permutation(len(self.train_samples))
            picks = [self.train_samples[i] for i in order[:RECALIBRATION_FRAMES]]
            self.recalibration = picks[d.rank::d.world]
        data_cfg = data_config(cfg)
        augment = None if cfg.augment == "none" else RandomAugment(cfg.augment, cfg.seed, self.fold)
        size = tuple(cfg.train_size)
        self.train_set = train_set = TrainingFrames(items, data_cfg, size, augment=augment)
        val_set = TrainingFrames(self.val_samples, data_cfg, size)
        self.sampler = EpochSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True,
                                    seed=cfg.seed + self.fold)
        self.train_loader = _loader(train_set, cfg.batch_size, self.sampler, self.options.workers, self.on_cuda)
        self.val_loader = _loader(Subset(val_set, range(d.rank, len(val_set), d.world)), cfg.batch_size, None,
                                  self.options.workers, self.on_cuda)
        if d.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[d.device.index] if self.on_cuda else None)

    def _write_fold_config(self, items: Sequence[Sample]) -> None:
        from trainer.balance import class_counts

        c = self.cfg.num_classes
        before, after = class_counts(self.train_samples, c).tolist(), class_counts(items, c).tolist()
        log.info("fold %d: %d training records (%d images; per class %s -> %s), %d validation images, "
                 "%d parameters (%d trainable)", self.fold, len(items), len(self.train_samples), before, after,
                 len(self.val_samples), self.total_params, self.trainable_params)
        _write_json(self.paths.config, {
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
        (normalised as the exported graph's :func:`engine.model.preprocess` does) and float targets."""
        import torch

        from engine.model import scaled_input

        for frames, masks in loader:
            frames = frames.to(self.d.device, non_blocking=True)
            masks = masks.to(self.d.device, non_blocking=True)
            x = scaled_input(frames, self.meta).contiguous(memory_format=self.memory_format)
            yield x, masks.to(torch.float32)

    # ------------------------------------------------------------------ one epoch

    def _autocast(self):
        import torch

        return torch.autocast(self.d.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _new_sums(self):
        import torch

        return torch.zeros(2 + 3 * self.cfg.num_classes, device=self.d.device, dtype=torch.float64)

    def _accumulate(self, sums, loss, logits, y) -> None:
        """Adds a batch's loss and Dice sums: [loss * n, n, intersection (C), predicted (C), truth (C)]."""
        import torch

        c = self.cfg.num_classes
        p = torch.sigmoid(logits.detach().float())
        n = y.shape[0]
        sums[0] += loss.detach().float() * n
        sums[1] += n
        sums[2:2 + c] += (p * y).sum((0, 2, 3))
        sums[2 + c:2 + 2 * c] += p.sum((0, 2, 3))
        sums[2 + 2 * c:] += y.sum((0, 2, 3))

    def _loss(self, out, y):
        """(mask logits, loss): the segmentation loss, plus the gate head's BCE on presence labels."""
        import torch.nn.functional as F

        # Losses and metrics in fp32, whatever the network ran in.
        if not isinstance(out, (tuple, list)):
            return out, self.criterion(out.float(), y)
        presence = y.flatten(2).amax(dim=2)
        return out[0], self.criterion(out[0].float(), y) + F.binary_cross_entropy_with_logits(out[1].float(), presence)

    def train_epoch(self, epoch: int):
        """One pass over the training loader; returns the summed statistics (this process's share)."""
        from engine.cli_util import progress_bar
        from engine.model import padded_logits

        self.sampler.set_epoch(epoch)
        self.model.train()
        if self.cfg.freeze_encoder:
            self.unet.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics too (as Keras does)
        sums = self._new_sums()
        bar = progress_bar(self.batches(self.train_loader), total=len(self.train_loader),
                           desc=f"fold {self.fold} epoch {epoch}/{self.cfg.epochs}", leave=False,
                           dynamic_ncols=True, disable=not (self.d.main and self.options.progress))
        steps = len(self.train_loader)
        for step, (x, y) in enumerate(bar):
            if self.crops is not None:
                x, y = self.crops(x, y, epoch, step)
            if self.cfg.lr_schedule == "cosine":
                for group in self.optimizer.param_groups:
                    group["lr"] = cosine_lr(self.cfg.lr, epoch, step, steps, self.cfg.epochs)
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
        if self.crops is not None:
            self.recalibrate_batchnorm()
        if self.d.distributed:
            from trainer.distributed import average_buffers

            average_buffers(self.unet, self.d.world)
        return sums

    def recalibrate_batchnorm(self) -> None:
        """Crop training: the BatchNorm running statistics re-estimated on whole training frames.

        A crop-trained network's statistics come from its last batches of crops, centred on defects
        with probability ``--crop-defect-p`` (0.7 by default); on whole frames, mostly defect-free, they shift the activations enough to
        flood the masks (on the synthetic strips the validation loss jumped between 0.7 and 1.7-5.8
        from one epoch to the next; the same weights with statistics re-estimated on 64 whole
        training frames scored 0.59). Resets every BatchNorm layer being trained (a frozen encoder's
        are not) and averages its statistics over :data:`RECALIBRATION_FRAMES` whole training frames,
        unaugmented and without gradients, as validation, export and serving see frames.
        """
        import torch

        from engine.model import padded_logits, scaled_input

        layers = [m for m in self.unet.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
        if not layers or not self.recalibration:
            return
        momenta = [m.momentum for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        step = self.cfg.batch_size
        with torch.no_grad():
            for i in range(0, len(self.recalibration), step):
                frames = torch.stack([self.train_set.scaled(s)[0] for s in self.recalibration[i:i + step]])
                x = scaled_input(frames.to(self.d.device), self.meta).contiguous(memory_format=self.memory_format)
                # fp32 whatever --amp says: the statistics must describe the activations the exported
                # fp32 graph computes (under bf16 autocast they were off by up to 8 % relative).
                padded_logits(self.unet, x, self.cfg.train_size, self.stride)
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum

    def validate(self):
        """The validation loader's summed statistics (this process's share)."""
        import torch

        from engine.model import padded_logits

        self.model.eval()
        sums = self._new_sums()
        with torch.no_grad():
            for x, y in self.batches(self.val_loader):
                with self._autocast():
                    out = padded_logits(self.unet, x, self.cfg.train_size, self.stride)
                logits, loss = self._loss(out, y)
                self._accumulate(sums, loss, logits, y)
        return sums

    def summarise(self, sums) -> tuple[float, float, list[float]]:
        """(mean loss, overall Dice, per-class Dice) over every process's sums."""
        from trainer.distributed import all_reduce_sum
        from trainer.metrics import dice_from_sums

        c = self.cfg.num_classes
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
        self.seconds += time.perf_counter() - started
        row: dict[str, float] = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                                 "train_dice": train_dice, "val_dice": val_dice}
        row.update({f"train_dice_{k + 1}": v for k, v in enumerate(train_dice_c)})
        row.update({f"val_dice_{k + 1}": v for k, v in enumerate(val_dice_c)})
        row.update({"lr": lr, "seconds": round(time.perf_counter() - started, 3)})
        finished = self.stopping.stop or epoch == self.cfg.epochs
        if self.d.main:
            self.save(epoch, row, improved, finished)
            log.info("fold %d epoch %d/%d: train loss %.4f Dice %.4f | val loss %.4f Dice %.4f%s | %.1fs", self.fold,
                     epoch, self.cfg.epochs, train_loss, train_dice, val_loss, val_dice, " *" if improved else "",
                     row["seconds"])
        return row, finished

    # ------------------------------------------------------------------ saving

    def facts(self, row: dict[str, float]) -> FoldFacts:
        from engine.checkpoint import FoldFacts

        cfg = self.cfg
        return FoldFacts(
            fold=self.fold, epoch=int(row["epoch"]), val_loss=row["val_loss"], val_dice=row["val_dice"],
            train_loss=row["train_loss"], train_dice=row["train_dice"], input_size=(int(cfg.height), int(cfg.width)),
            train_size=cfg.train_size, class_names=tuple(cfg.class_names or ()), mean=float(cfg.mean),
            std=float(cfg.std), encoder_weights=cfg.encoder_weights, params_total=self.total_params,
            params_trainable=self.trainable_params,
        )

    def training_state(self, finished: bool) -> rundir.TrainingState:
        return rundir.TrainingState(
            optimizer=self.optimizer.state_dict(),
            scheduler=None if self.scheduler is None else self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            early_stopping=self.stopping.state(), rng=_rng_state(), seconds=self.seconds, finished=finished,
            best_epoch=self.stopping.best_epoch, best_val_loss=self.stopping.best_val_loss,
        )

    def save(self, epoch: int, row: dict[str, float], improved: bool, finished: bool) -> None:
        """Writes the epoch's metrics row and curves, then ``last.pt``, then (when improved) ``best.pt``.

        The order matters for resuming (see :meth:`restore`).
        """
        from engine.model import save_fold_checkpoint
        from trainer.curves import plot_curves

        rows = read_metrics(self.paths.metrics) + [row]
        write_metrics(self.paths.metrics, rows, metrics_columns(self.cfg.num_classes))
        plot_curves(rows, self.paths.curves, title=f"fold {self.fold}: {self.cfg.encoder} {self.cfg.arch}")
        facts = self.facts(row)
        ucfg = unet_config(self.cfg)
        save_fold_checkpoint(self.paths.last, ucfg, self.unet, facts, self.training_state(finished).to_dict())
        if improved:
            save_fold_checkpoint(self.paths.best, ucfg, self.unet, facts)


def cosine_lr(base: float, epoch: int, step: int, steps: int, epochs: int) -> float:
    """``--lr-schedule cosine``: the learning rate of ``step`` (0-based, of ``steps``) in ``epoch`` (1-based).

    A linear warm-up from ``base / 10`` to ``base`` over the first epoch (Adam's moment estimates
    settle before the largest steps), then a cosine decay to 0 at the end of epoch ``epochs``. A
    function of the position alone, so a resumed run continues the schedule exactly; an early stop
    simply ends it sooner.
    """
    import math

    steps = max(int(steps), 1)
    if epochs > 1 and epoch == 1:
        return base * (0.1 + 0.9 * step / steps)
    warm = 1 if epochs > 1 else 0
    t = (epoch - 1 - warm + step / steps) / (epochs - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def _amp_dtype(torch: Any, on_cuda: bool, amp: bool) -> Any:
    """The autocast dtype of ``--amp``: bf16 on CUDA where supported (else fp16), bf16 on a CPU with
    native bf16 (:func:`engine.cpu.supports_bf16`), None (fp32) otherwise."""
    from engine.cpu import cpu_autocast_dtype

    if not amp:
        return None
    if on_cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return cpu_autocast_dtype(amp)
