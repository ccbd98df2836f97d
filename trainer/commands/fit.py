"""``trainer fit``: k-fold U-Net training with early stopping, resumable, single process or DDP.

The flags fill :class:`trainer.config.FitConfig` (what defines the run) and
:class:`trainer.config.FitOptions` (how this invocation runs it), over an optional ``--config``
file; :mod:`trainer.plan` chooses what was not given of the data- and machine-dependent settings
(printed with a reason each; ``--plan-only`` stops there); :func:`trainer.fit.run_fit` trains.
Multi-GPU: ``torchrun --nproc-per-node N -m trainer.cli fit ...``.
"""

from __future__ import annotations

import argparse
import logging
from argparse import SUPPRESS
from pathlib import Path
from typing import Any

from engine.devices import CHOICES_TEXT, parse_device
from engine.metadata import ARCHS, GATE_POOLING
from network.config import DEFAULT_DECODER_CHANNELS
from trainer.config import (
    AUGMENT_LEVELS,
    ENCODER_WEIGHTS,
    LOSSES,
    LR_SCHEDULES,
    FitConfig,
    FitOptions,
    FitSettings,
    build,
    read_config_file,
    resolve,
    resolve_data,
)
from trainer.imagecheck import check_training_images

log = logging.getLogger(__name__)

HELP = "train the k-fold U-Nets of a run (resumable; multi-GPU through torchrun)"
DESCRIPTION = "k-fold U-Net training with early stopping, resumable, single process or DDP."


def _csv_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _csv_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_crop(text: str) -> tuple[int, int] | None:
    """``"96x320"`` -> ``(96, 320)`` (height x width, at the training scale); ``"none"`` -> None (whole frames)."""
    if str(text).strip().lower() == "none":
        return None
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"--crop must be HEIGHTxWIDTH at the training scale, e.g. 64x256; got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"--crop sides must be positive, got {text!r}")
    return h, w


def _device(text: str) -> str:
    """``--device``: any string :func:`engine.devices.parse_device` accepts (``cuda:1`` included)."""
    try:
        parse_device(text, "--device")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip().lower()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # default=SUPPRESSUPPRESS throughout: only flags actually given override the config file and the defaults.
    _data_flags(parser.add_argument_group("data"), FitSettings())
    _model_flags(parser.add_argument_group("model"), FitSettings())
    _optimisation_flags(parser.add_argument_group("optimisation"), FitSettings())
    _execution_flags(parser.add_argument_group("execution"))


def _data_flags(g: argparse._ArgumentGroup, d: FitSettings) -> None:
    g.add_argument("--data", action="append", metavar="DIR", default=SUPPRESS,
                   help="Severstal-format folder (train_images/ + train.csv); repeat to train on several together")
    g.add_argument("--out", metavar="RUN", default=SUPPRESS, help="run directory (created; reused to resume)")
    g.add_argument("--config", metavar="FILE", default=None, help="YAML or JSON file of settings (flags override it)")
    g.add_argument("--classes", dest="num_classes", type=int, default=SUPPRESS, help=f"defect classes (default {d.num_classes})")
    g.add_argument("--height", type=int, default=SUPPRESS, help="frame height (default: the size most images have)")
    g.add_argument("--width", type=int, default=SUPPRESS, help="frame width (default: the size most images have)")
    g.add_argument("--scale", type=float, default=SUPPRESS,
                   help="training resolution / frame resolution (default: planned so that the thinnest common "
                        "defects stay 4 px wide)")
    g.add_argument("--folds", type=int, default=SUPPRESS, help=f"cross-validation folds (default {d.folds})")
    g.add_argument("--holdout", type=float, default=SUPPRESS,
                   help=f"holdout: fraction < 1 or number of images, kept out of every fold (default {d.holdout})")
    g.add_argument("--folds-file", default=SUPPRESS, metavar="CSV",
                   help="use this folds.csv (e.g. from 'trainer split'); default: make one for the run")
    g.add_argument("--balance", action=argparse.BooleanOptionalAction, default=SUPPRESS,
                   help="oversample rare classes in training folds with flips/rotations (default on)")
    g.add_argument("--augment", choices=AUGMENT_LEVELS, default=SUPPRESS,
                   help="random augmentation of every training batch: flips, brightness/contrast (light); plus "
                        "shift/scale, gamma, defect blackout (strong); default none")
    g.add_argument("--crop", type=parse_crop, default=SUPPRESS, metavar="HxW",
                   help="train on random HxW crops at the training scale, centred on a rare class's defect "
                        "pixels with probability --crop-defect-p; validation and export use whole frames; "
                        "none: whole frames (default: planned from the training frame's size)")
    g.add_argument("--crop-defect-p", type=float, default=SUPPRESS, metavar="P",
                   help=f"probability that a crop is centred on a defect of its frame's rarest class, else placed "
                        f"uniformly (default {d.crop_defect_p})")
    g.add_argument("--balance-target", type=int, default=SUPPRESS, help="records per class (default: the commonest's)")
    g.add_argument("--prior-init", action=argparse.BooleanOptionalAction, default=SUPPRESS,
                   help="start the output bias at each class's defect-pixel fraction (default on)")


def _model_flags(m: argparse._ArgumentGroup, d: FitSettings) -> None:
    m.add_argument("--arch", choices=ARCHS, default=SUPPRESS,
                   help="segmentation network: smp U-Net or FPN (default unet; FPN: decoder-channels[0] is the "
                        "pyramid width, [1] the segmentation width)")
    m.add_argument("--gate", action=argparse.BooleanOptionalAction, default=SUPPRESS,
                   help="a classification head on the encoder trained on presence labels; in the graph a class "
                        "is present only when its head's probability also reaches the gate threshold (default off)")
    m.add_argument("--gate-pooling", choices=GATE_POOLING, default=SUPPRESS,
                   help=f"how the gate head pools the encoder's features over the frame: max (a defect counts the "
                        f"same in a crop and a whole frame) or avg (default {d.gate_pooling})")
    m.add_argument("--encoder", default=SUPPRESS, help=f"U-Net encoder (default {d.encoder})")
    m.add_argument("--encoder-weights", choices=ENCODER_WEIGHTS, default=SUPPRESS,
                   help=f"encoder initialisation (default {d.encoder_weights}; needs the internet once)")
    m.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=SUPPRESS,
                   help="train only the decoder (the thesis' setting with pretrained weights)")
    m.add_argument("--in-channels", type=int, default=SUPPRESS, help=f"network input channels (default {d.in_channels})")
    m.add_argument("--encoder-depth", type=int, default=SUPPRESS,
                   help="encoder stages 1..5 (default: planned: 3 on a CPU, up to 5 on CUDA)")
    m.add_argument("--decoder-channels", type=_csv_ints, default=SUPPRESS, metavar="C1,C2,..",
                   help="decoder widths, one per encoder stage (default: planned: 32,16,8 on a CPU, "
                        f"{','.join(map(str, DEFAULT_DECODER_CHANNELS))} cut to the depth on CUDA)")
    m.add_argument("--mean", type=float, default=SUPPRESS, help="input normalisation mean after /255 (default per weights)")
    m.add_argument("--std", type=float, default=SUPPRESS, help="input normalisation std after /255 (default per weights)")


def _optimisation_flags(o: argparse._ArgumentGroup, d: FitSettings) -> None:
    o.add_argument("--budget-min", type=float, default=SUPPRESS, metavar="M",
                   help="wall-clock minutes of training: one fold (unless --fold), its cosine schedule fitted "
                        "to the epochs the budget holds, from the measured epoch times")
    o.add_argument("--epochs", type=int, default=SUPPRESS,
                   help="maximum epochs per fold (default: planned: 150, or what --budget-min holds)")
    o.add_argument("--patience", type=int, default=SUPPRESS,
                   help="early-stopping patience in epochs (default: planned: 15; off with --budget-min)")
    o.add_argument("--batch-size", type=int, default=SUPPRESS,
                   help="batch size per process (default: planned: 8 on a CPU, 16-32 on CUDA)")
    o.add_argument("--lr", type=float, default=SUPPRESS, help=f"Adam learning rate (default {d.lr})")
    o.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=SUPPRESS,
                   help="none; plateau: halve on a validation plateau; cosine: per-step cosine decay from --lr to 0 "
                        f"over --epochs, after a linear warm-up over the first epoch (default {d.lr_schedule})")
    o.add_argument("--loss", choices=LOSSES, default=SUPPRESS, help=f"training loss (default {d.loss})")
    o.add_argument("--pos-weight", type=_csv_floats, default=SUPPRESS, metavar="W1,W2,..",
                   help="per-class weight of defect pixels in the BCE, e.g. 2,2,1,1.5")
    o.add_argument("--amp", action=argparse.BooleanOptionalAction, default=SUPPRESS,
                   help="mixed precision: bf16 autocast + channels_last on CUDA (fp16 where bf16 is not supported) "
                   "and on a CPU with native bf16 (AVX-512 BF16/AMX); losses and metrics stay fp32. Default: on "
                   "for CUDA, off on CPUs (bf16 training on the CPU lost thin scratches on an independent set: "
                   "benchmarks/RESULTS.md)")
    o.add_argument("--seed", type=int, default=SUPPRESS, help=f"seed for splits, balancing and training (default {d.seed})")


def _execution_flags(x: argparse._ArgumentGroup) -> None:
    x.add_argument("--fold", type=int, default=SUPPRESS, help="train only this fold (0-based); default: every fold")
    x.add_argument("--device", type=_device, default=SUPPRESS,
                   help=f"{CHOICES_TEXT}; auto = CUDA when available (default)")
    x.add_argument("--workers", type=int, default=SUPPRESS, help="data-loader worker processes (default 2)")
    x.add_argument("--restart", action="store_true", default=SUPPRESS,
                   help="delete the run directory's checkpoints and results and start over")
    x.add_argument("--progress", action=argparse.BooleanOptionalAction, default=SUPPRESS,
                   help="draw progress bars (default: only when the output is a terminal)")
    x.add_argument("--plan-only", action="store_true", default=False,
                   help="print the planned configuration (and what the data and machine look like) and stop")


def settings_from_args(args: argparse.Namespace) -> tuple[FitSettings, FitOptions, dict[str, Any]]:
    """Defaults < ``--config FILE`` < flags, and the values given by either (what the planner must not change)."""
    file_config, file_options = read_config_file(args.config) if args.config else ({}, {})
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command", "debug", "plan_only")}
    settings, options = build({**file_config, **file_options}, flags)
    if not options.out and not getattr(args, "plan_only", False):
        raise ValueError("no run directory: give --out RUN")
    keys = set(file_config) | set(file_options) | {k.replace("-", "_") for k in flags}
    given = {k: getattr(settings, k) if hasattr(settings, k) else getattr(options, k) for k in keys}
    return settings, options, given


def config_from_args(args: argparse.Namespace) -> tuple[FitConfig, FitOptions]:
    """Defaults < ``--config FILE`` < flags, resolved against the data (without the planner)."""
    settings, options, _ = settings_from_args(args)
    return resolve(settings), options


def run(args: argparse.Namespace) -> int:
    from trainer.fit import run_fit
    from trainer.plan import fingerprint_lines, plan_fit

    settings, options, given = settings_from_args(args)
    data, frames = resolve_data(settings)
    # Every image, before any training starts.
    check_training_images([Path(d) for d in data], frames.size, progress=options.progress)
    settings, options, plan = plan_fit(settings, options, given)
    cfg = resolve(settings)
    print("\n".join([*fingerprint_lines(plan), "plan (flags and --config win; their reason is 'given'):",
                      *plan.lines()]), flush=True)
    if args.plan_only:
        return 0
    try:
        outcomes = run_fit(cfg, options, planned=plan.to_dict())
    except KeyboardInterrupt:
        log.warning("interrupted: run the same command again to resume from the last finished epoch")
        raise
    for o in outcomes:
        ending = " (stopped early)" if o.stopped_early else " (budget spent)" if o.budget_spent else ""
        log.info("fold %d: best epoch %d, val loss %.4f, %d epochs, %.1f min%s", o.fold, o.best_epoch,
                 o.best_val_loss, o.epochs_run, o.seconds / 60, ending)
    return 0
