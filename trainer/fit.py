"""``trainer fit``: k-fold U-Net training with early stopping, resumable, single process or DDP.

Per fold ``k`` the run directory gets ``fold{k}/best.pt`` (lowest validation loss),
``fold{k}/last.pt`` (the latest epoch plus optimiser, scheduler, early-stopping and RNG state),
``fold{k}/metrics.csv``, ``fold{k}/curves.png`` and ``fold{k}/config.json``. Re-running the same
command resumes every unfinished fold at the epoch after its ``last.pt``; finished folds are
skipped. The run directory's ``config.json`` pins the run's settings: a ``fit`` with different
ones refuses unless ``--restart`` says to start over.

The network sees exactly what the exported inspection graph computes: the loader yields
full-resolution uint8 frames and 0/1 masks, and the batch goes through
:func:`engine.model.preprocess` and :func:`engine.model.downscale_masks` on the device.

Multi-GPU / multi-node: launch with ``torchrun --nproc-per-node N -m trainer.cli fit ...``.
Each process trains on its :class:`~torch.utils.data.DistributedSampler` share of every epoch
(``--batch-size`` is per process), validation statistics are summed over processes, and rank 0
alone writes files and logs. The gloo backend serves CPUs, NCCL GPUs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from trainer.config import (
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

if TYPE_CHECKING:
    import torch
    from torch import nn

    from engine.metadata import ModelMetadata
    from trainer.data import DataConfig, Sample

log = logging.getLogger(__name__)

HELP = "train the k-fold U-Nets of a run (resumable; multi-GPU through torchrun)"
DESCRIPTION = __doc__.split("\n\n", 1)[0].split(": ", 1)[1]

RUN_CONFIG = "config.json"
RUN_FOLDS = "folds.csv"
# What --restart deletes from a run directory: everything fit and evaluate write, nothing else.
RUN_OUTPUTS = ("config.json", "folds.csv", "postprocess.json", "report.md", "report.json", "evaluations", "renders")


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
    g.add_argument("--height", type=int, default=S, help="frame height (default: read from the first image)")
    g.add_argument("--width", type=int, default=S, help="frame width (default: read from the first image)")
    g.add_argument("--scale", type=float, default=S, help=f"training resolution / frame resolution (default {d.scale})")
    g.add_argument("--folds", type=int, default=S, help=f"cross-validation folds (default {d.folds})")
    g.add_argument("--holdout", type=float, default=S,
                   help=f"holdout: fraction < 1 or number of images, kept out of every fold (default {d.holdout})")
    g.add_argument("--folds-file", default=S, metavar="CSV",
                   help="use this folds.csv (e.g. from 'trainer split'); default: make one for the run")
    g.add_argument("--balance", action=argparse.BooleanOptionalAction, default=S,
                   help="oversample rare classes in training folds with flips/rotations (default on)")
    g.add_argument("--balance-target", type=int, default=S, help="records per class (default: the commonest's)")
    g.add_argument("--prior-init", action=argparse.BooleanOptionalAction, default=S,
                   help="start the output bias at each class's defect-pixel fraction (default on)")
    m = parser.add_argument_group("model")
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
    o.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=S, help="none, or halve on a validation plateau")
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
    try:
        outcomes = run_fit(cfg, options)
    except KeyboardInterrupt:
        log.warning("interrupted: run the same command again to resume from the last finished epoch")
        raise
    for o in outcomes:
        log.info("fold %d: best epoch %d, val loss %.4f, %d epochs, %.1f min%s", o.fold, o.best_epoch,
                 o.best_val_loss, o.epochs_run, o.seconds / 60, "" if o.finished else " (unfinished)")
    return 0


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """This process's place in a (possibly single-process) training job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    """Joins the torchrun job described by the environment (RANK, WORLD_SIZE, ...) if there is one."""
    import torch
    import torch.distributed as dist

    from engine.devices import parse_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    parsed = parse_device(device, "--device")
    use_cuda = parsed.is_cuda or (parsed.is_auto and torch.cuda.is_available())
    if parsed.is_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu or auto")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    initialised = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        initialised = True
    return Dist(rank=rank, world=world, local_rank=local_rank, device=torch_device, initialised_here=initialised)


def _barrier(d: Dist) -> None:
    if d.distributed:
        import torch.distributed as dist

        dist.barrier()


def _on_main_then_share(d: Dist, work: Callable[[], Any]) -> Any:
    """Runs ``work`` on rank 0; every rank gets its result, or raises its error (no rank hangs)."""
    if not d.distributed:
        return work()
    import torch.distributed as dist

    payload: list[Any] = [None]
    if d.main:
        try:
            payload = [("ok", work())]
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            payload = [("error", exc)]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value


# --------------------------------------------------------------------------- pretrained weights


def check_pretrained_reachable(
    encoder: str, weights: str = "imagenet", timeout: float = 3.0, endpoint: str | None = None,
    cache_dir: str | None = None,
) -> None:
    """Fails fast, with advice, when pretrained weights are neither cached nor downloadable.

    smp fetches encoder weights from the Hugging Face hub; without this check an offline machine
    would wait on network timeouts and end in a traceback.

    Raises:
        RuntimeError: the weights are not cached and the hub (or the proxy) cannot be reached.
        ValueError: the encoder has no such weights.
    """
    import urllib.request

    import segmentation_models_pytorch as smp
    from huggingface_hub import constants, try_to_load_from_cache

    from engine.model import ENCODERS

    settings = smp.encoders.encoders[ENCODERS[encoder]]["pretrained_settings"].get(weights)
    if settings is None:
        raise ValueError(f"encoder {encoder} has no {weights!r} weights; use --encoder-weights none")
    repo, revision = settings["repo_id"], settings.get("revision")
    cached = all(
        isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision), str)
        for name in ("config.json", "model.safetensors")
    )
    if cached:
        return
    endpoint = endpoint or constants.ENDPOINT
    proxy = urllib.request.getproxies().get(urlparse(endpoint).scheme)
    target = urlparse(proxy if proxy else endpoint)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except OSError as exc:
        via = f" through the proxy {proxy}" if proxy else ""
        raise RuntimeError(
            f"--encoder-weights {weights}: the {encoder} weights ({repo}) are not in the Hugging Face cache and "
            f"{endpoint} cannot be reached{via} ({exc}). Use --encoder-weights none to train from random "
            "initialisation, or download the weights once on a machine with internet access into the cache "
            "(HF_HOME)."
        ) from None


def build_model(cfg: FitConfig, pretrained: bool) -> nn.Module:
    """The fold's U-Net, with the configured encoder weights when ``pretrained``."""
    from engine.model import build_unet

    ucfg = unet_config(cfg)
    if not pretrained or cfg.encoder_weights == "none":
        return build_unet(ucfg, encoder_weights=None)
    check_pretrained_reachable(cfg.encoder, cfg.encoder_weights)
    try:
        return build_unet(ucfg, encoder_weights=cfg.encoder_weights)
    except Exception as exc:  # noqa: BLE001 - downloads fail in many ways; all mean the same to the user
        raise RuntimeError(
            f"--encoder-weights {cfg.encoder_weights}: loading the {cfg.encoder} weights failed "
            f"({type(exc).__name__}: {exc}); use --encoder-weights none to train from random initialisation"
        ) from None


def unet_config(cfg: FitConfig):
    from engine.model import UNetConfig

    return UNetConfig(
        encoder=cfg.encoder, in_channels=cfg.in_channels, num_classes=cfg.num_classes,
        encoder_depth=cfg.encoder_depth, decoder_channels=tuple(cfg.decoder_channels or ()),
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
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for fold_dir in out.glob("fold*"):
        if fold_dir.is_dir() and fold_dir.name[4:].isdigit():
            shutil.rmtree(fold_dir)


def prepare_run(cfg: FitConfig, options: FitOptions) -> dict[str, int]:
    """Checks or writes ``RUN/config.json``, fixes the split in ``RUN/folds.csv``; returns it.

    Raises:
        ValueError: the run directory holds a run with other settings (and no ``--restart``),
            or training outputs without a config.
    """
    from trainer.data import load_samples
    from trainer.splits import load_or_make_folds

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / RUN_CONFIG
    if options.restart:
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
    elif any(p.is_dir() and p.name.startswith("fold") for p in out.iterdir()):
        raise ValueError(f"{out} has fold folders but no {RUN_CONFIG}; use --restart to start over there")
    _write_json(config_path, cfg.to_dict())

    samples = load_samples([Path(p) for p in cfg.data], data_config(cfg))
    if not samples:
        raise ValueError(f"no images found in {', '.join(cfg.data)}")
    run_folds = out / RUN_FOLDS
    source = run_folds if run_folds.exists() or cfg.folds_file is None else Path(cfg.folds_file)
    assignment = load_or_make_folds(source, samples, cfg.num_classes, cfg.folds, cfg.holdout_count_or_fraction,
                                    cfg.seed)
    if source != run_folds:
        shutil.copyfile(source, run_folds)
    return assignment


def _write_json(path: Path, data: Any) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def metrics_columns(num_classes: int) -> list[str]:
    """``metrics.csv`` header: overall columns, then per-class Dice (class ids 1..C)."""
    per_class = [f"{split}_dice_{k}" for split in ("train", "val") for k in range(1, num_classes + 1)]
    return ["epoch", "train_loss", "val_loss", "train_dice", "val_dice", *per_class, "lr", "seconds"]


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_metrics(path: Path, rows: Sequence[dict[str, Any]], columns: list[str]) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


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
    fold: int
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    seconds: float
    finished: bool


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
    import torch

    from trainer.data import load_samples
    from trainer.splits import read_folds

    if options.fold is not None and not 0 <= options.fold < cfg.folds:
        raise ValueError(f"--fold {options.fold} is out of range for --folds {cfg.folds} (0..{cfg.folds - 1})")
    d = setup_distributed(options.device)
    try:
        assignment = _on_main_then_share(d, lambda: prepare_run(cfg, options))
        samples = load_samples([Path(p) for p in cfg.data], data_config(cfg))
        if not d.main:
            assignment = read_folds(Path(options.out) / RUN_FOLDS)
        folds = range(cfg.folds) if options.fold is None else [options.fold]
        outcomes = []
        for fold in folds:
            outcomes.append(train_fold(cfg, options, d, fold, samples, assignment, on_epoch_end))
        if d.main:
            from trainer.report import write_report

            write_report(Path(options.out))
        _barrier(d)
        return outcomes
    finally:
        if d.initialised_here:
            torch.distributed.destroy_process_group()


def _average_buffers(unet: nn.Module, world: int) -> None:
    """Averages BatchNorm running statistics over the processes.

    DDP keeps parameters identical but each process's running statistics follow its own batches
    (DDP only re-broadcasts rank 0's at the next forward). Averaging them once per epoch makes the
    validated model, and the checkpoint rank 0 writes, the same on every rank and built from all data.
    """
    import torch.distributed as dist

    for buffer in unet.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world)
        else:
            dist.broadcast(buffer, src=0)


def _loader(dataset, batch_size: int, sampler, workers: int, pin: bool):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0, drop_last=False)


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
    import torch
    from torch.utils.data import DistributedSampler, Subset
    from tqdm import tqdm

    from engine.model import downscale_masks, load_checkpoint, preprocess, save_fold_checkpoint
    from trainer.augment import balance_plan, class_counts
    from trainer.data import SeverstalDataset
    from trainer.losses import SegmentationLoss
    from trainer.metrics import dice_from_sums
    from trainer.render import plot_curves
    from trainer.splits import HOLDOUT

    out = Path(options.out)
    fold_dir = out / f"fold{fold}"
    best_path, last_path, metrics_path = fold_dir / "best.pt", fold_dir / "last.pt", fold_dir / "metrics.csv"
    c = cfg.num_classes
    columns = metrics_columns(c)
    train_samples = [s for s in samples if assignment[s.image_id] not in (fold, HOLDOUT)]
    val_samples = [s for s in samples if assignment[s.image_id] == fold]
    if not train_samples or not val_samples:
        raise ValueError(f"fold {fold} has {len(train_samples)} training and {len(val_samples)} validation images; "
                         "the data is too small for this many folds")

    resume = load_checkpoint(last_path) if last_path.exists() else None
    if resume is not None and resume.get("finished"):
        if d.main:
            log.info("fold %d: finished earlier (best epoch %d), skipping", fold, resume["best_epoch"])
        return FoldOutcome(fold, resume["best_epoch"], resume["best_val_loss"], resume["epoch"], resume["seconds"],
                           True)

    torch.manual_seed(cfg.seed + fold)
    unet = build_model(cfg, pretrained=resume is None and d.main)
    total_params = disable_unused_parameters(unet, cfg)
    if resume is None and cfg.prior_init:
        priors = class_pixel_priors(train_samples, cfg)
        init_output_prior(unet, priors)
        if d.main:
            log.info("fold %d: output bias set to the defect-pixel priors %s", fold, [f"{p:.2e}" for p in priors])
    if cfg.freeze_encoder:
        unet.encoder.requires_grad_(False)
    trainable_params = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    meta = preprocessing_metadata(cfg)
    train_size = cfg.train_size
    on_cuda = d.device.type == "cuda"
    amp_dtype = _amp_dtype(torch, on_cuda, cfg.amp)
    memory_format = torch.channels_last if on_cuda or amp_dtype is not None else torch.contiguous_format
    unet.to(d.device, memory_format=memory_format)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=max(1, cfg.patience // 3))
                 if cfg.lr_schedule == "plateau" else None)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    stopping = _EarlyStopping(cfg.patience)
    start_epoch, seconds = 1, 0.0

    if d.main:
        fold_dir.mkdir(parents=True, exist_ok=True)
    _barrier(d)
    if resume is not None:
        unet.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None and resume.get("scheduler") is not None:
            scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler") is not None:
            scaler.load_state_dict(resume["scaler"])
        stopping = _EarlyStopping(cfg.patience, **resume["early_stopping"])
        start_epoch, seconds = int(resume["epoch"]) + 1, float(resume["seconds"])
        _set_rng_state(resume["rng"])
        if d.main:
            # Rows after the checkpoint come from an epoch that was cut short before last.pt: redone now.
            rows = [r for r in read_metrics(metrics_path) if int(r["epoch"]) < start_epoch]
            _write_metrics(metrics_path, rows, columns)
            if stopping.best_epoch == resume["epoch"] and (
                not best_path.exists() or load_checkpoint(best_path).get("epoch") != resume["epoch"]
            ):
                # Interrupted between writing last.pt and best.pt: last.pt holds the best weights.
                save_fold_checkpoint(best_path, unet_config(cfg), unet, **_checkpoint_facts(resume))
            log.info("fold %d: resuming at epoch %d of %d (best so far: epoch %d)", fold, start_epoch, cfg.epochs,
                     stopping.best_epoch)
    elif d.main:
        for stale in (metrics_path, best_path, fold_dir / "curves.png"):
            stale.unlink(missing_ok=True)

    train_items = balance_plan(train_samples, c, cfg.balance_target, seed=cfg.seed + fold) if cfg.balance \
        else list(train_samples)
    if d.main:
        before, after = class_counts(train_samples, c).tolist(), class_counts(train_items, c).tolist()
        log.info("fold %d: %d training records (%d images; per class %s -> %s), %d validation images, "
                 "%d parameters (%d trainable)", fold, len(train_items), len(train_samples), before, after,
                 len(val_samples), total_params, trainable_params)
        _write_json(fold_dir / "config.json", {
            "fold": fold,
            "config": cfg.to_dict(),
            "options": dataclasses.asdict(options) | {"device": str(d.device), "world_size": d.world},
            "data": {"train_images": len(train_samples), "train_records": len(train_items),
                     "val_images": len(val_samples), "class_counts_before_balancing": before,
                     "class_counts_after_balancing": after},
            "model": {"params_total": total_params, "params_trainable": trainable_params},
        })

    data_cfg = data_config(cfg)
    train_set = SeverstalDataset(train_items, data_cfg, scale=1.0)
    val_set = SeverstalDataset(val_samples, data_cfg, scale=1.0)
    sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed + fold)
    train_loader = _loader(train_set, cfg.batch_size, sampler, options.workers, on_cuda)
    val_loader = _loader(Subset(val_set, range(d.rank, len(val_set), d.world)), cfg.batch_size, None, options.workers,
                         on_cuda)
    model: nn.Module = unet
    if d.distributed:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[d.device.index] if on_cuda else None)
    criterion = SegmentationLoss(cfg.loss, cfg.pos_weight).to(d.device)

    def batches(loader):
        for frames, masks in loader:
            frames = frames.to(d.device, non_blocking=True)
            masks = masks.to(d.device, non_blocking=True)
            x = preprocess(frames, meta).contiguous(memory_format=memory_format)
            yield x, downscale_masks(masks, train_size)

    def accumulate(sums: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        p = torch.sigmoid(logits.detach().float())
        n = y.shape[0]
        sums[0] += loss.detach().float() * n
        sums[1] += n
        sums[2:2 + c] += (p * y).sum((0, 2, 3))
        sums[2 + c:2 + 2 * c] += p.sum((0, 2, 3))
        sums[2 + 2 * c:] += y.sum((0, 2, 3))

    def summarise(sums: torch.Tensor) -> tuple[float, float, list[float]]:
        if d.distributed:
            torch.distributed.all_reduce(sums)
        s = sums.cpu().double().numpy()
        inter, pred, truth = s[2:2 + c], s[2 + c:2 + 2 * c], s[2 + 2 * c:]
        overall = float(dice_from_sums(inter.sum(), pred.sum(), truth.sum()))
        return float(s[0] / max(s[1], 1.0)), overall, [float(v) for v in dice_from_sums(inter, pred, truth)]

    def autocast():
        return torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        model.train()
        if cfg.freeze_encoder:
            unet.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics too (as Keras does)
        train_sums = torch.zeros(2 + 3 * c, device=d.device, dtype=torch.float64)
        bar = tqdm(batches(train_loader), total=len(train_loader), desc=f"fold {fold} epoch {epoch}/{cfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=not (d.main and options.progress))
        for x, y in bar:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = model(x)
            loss = criterion(logits.float(), y)  # losses and metrics in fp32, whatever the U-Net ran in
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            accumulate(train_sums, loss, logits, y)
            bar.set_postfix(loss=f"{(train_sums[0] / train_sums[1]).item():.4f}")
        bar.close()
        if d.distributed:
            _average_buffers(unet, d.world)
        model.eval()
        val_sums = torch.zeros_like(train_sums)
        with torch.no_grad():
            for x, y in batches(val_loader):
                with autocast():
                    logits = unet(x)
                accumulate(val_sums, criterion(logits.float(), y), logits, y)
        train_loss, train_dice, train_dice_c = summarise(train_sums)
        val_loss, val_dice, val_dice_c = summarise(val_sums)
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step(val_loss)
        improved = stopping.update(epoch, val_loss)
        seconds += time.perf_counter() - started
        row: dict[str, float] = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                                 "train_dice": train_dice, "val_dice": val_dice}
        row.update({f"train_dice_{k + 1}": v for k, v in enumerate(train_dice_c)})
        row.update({f"val_dice_{k + 1}": v for k, v in enumerate(val_dice_c)})
        row.update({"lr": lr, "seconds": round(time.perf_counter() - started, 3)})
        finished = stopping.stop or epoch == cfg.epochs
        if d.main:
            facts = dict(
                fold=fold, epoch=epoch, val_loss=val_loss, val_dice=val_dice, train_loss=train_loss,
                train_dice=train_dice, input_size=(int(cfg.height), int(cfg.width)), train_size=train_size,
                class_names=list(cfg.class_names or []), mean=float(cfg.mean), std=float(cfg.std),
                encoder_weights=cfg.encoder_weights, params_total=total_params, params_trainable=trainable_params,
            )
            rows = read_metrics(metrics_path) + [row]
            _write_metrics(metrics_path, rows, columns)
            plot_curves(rows, fold_dir / "curves.png", title=f"fold {fold}: {cfg.encoder} U-Net")
            # Order matters for resuming: metrics, then last.pt, then best.pt (see the resume branch).
            save_fold_checkpoint(
                last_path, unet_config(cfg), unet, **facts,
                optimizer=optimizer.state_dict(), scheduler=None if scheduler is None else scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else None,
                early_stopping={k: v for k, v in dataclasses.asdict(stopping).items() if k != "patience"},
                rng=_rng_state(), seconds=seconds, finished=finished, best_epoch=stopping.best_epoch,
                best_val_loss=stopping.best_val_loss,
            )
            if improved:
                save_fold_checkpoint(best_path, unet_config(cfg), unet, **facts)
            log.info("fold %d epoch %d/%d: train loss %.4f Dice %.4f | val loss %.4f Dice %.4f%s | %.1fs", fold,
                     epoch, cfg.epochs, train_loss, train_dice, val_loss, val_dice, " *" if improved else "",
                     row["seconds"])
        _barrier(d)
        if on_epoch_end is not None:
            on_epoch_end(EpochEnd(fold=fold, epoch=epoch, row=row, unet=unet, rank=d.rank, stopped=finished))
        if stopping.stop:
            if d.main:
                log.info("fold %d: early stop after epoch %d (no better validation loss for %d epochs; best epoch %d)",
                         fold, epoch, cfg.patience, stopping.best_epoch)
            break
    return FoldOutcome(fold, stopping.best_epoch, stopping.best_val_loss, epoch, seconds, True)


def _amp_dtype(torch: Any, on_cuda: bool, amp: bool) -> Any:
    """The autocast dtype of ``--amp``: bf16 on CUDA where supported (else fp16), bf16 on a CPU with
    native bf16 (:func:`engine.cpu.supports_bf16`), None (fp32) otherwise."""
    from engine.cpu import cpu_autocast_dtype

    if not amp:
        return None
    if on_cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return cpu_autocast_dtype(amp)


def _checkpoint_facts(payload: dict[str, Any]) -> dict[str, Any]:
    """The best.pt fields of a last.pt payload (everything but resume state)."""
    resume_only = {"format", "unet", "state_dict", "optimizer", "scheduler", "scaler", "early_stopping", "rng",
                   "seconds", "finished", "best_epoch", "best_val_loss"}
    return {k: v for k, v in payload.items() if k not in resume_only}
