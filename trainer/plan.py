"""``trainer fit``'s planner: from the data's and the machine's fingerprints (:mod:`trainer.fingerprint`) and
the wall-clock budget to the settings that depend on them, each with one reason.

As nnU-Net's experiment planner does for medical volumes, the rules read the data before choosing:

- **scale**: the smallest training scale at which the thinnest common defects stay
  :data:`MIN_DEFECT_PX` pixels wide at the network's output (full training resolution), and the
  training frame's short side at least :data:`MIN_TRAIN_SIDE`;
- **crop**: random crops of :data:`CPU_CROP` (CUDA: :data:`CUDA_CROP`) pixels when the training frame
  holds at least twice as many, else whole frames;
- **encoder depth**: the deepest features at least :data:`MIN_BOTTLENECK` pixels on a side (nnU-Net's
  smallest feature map), and on a CPU at most the measured 3 stages; **decoder widths** to match;
- **batch size**: 8 on a CPU (the measured recipe), 16 on CUDA (32 with 40 GiB), and a batch at most
  5 % of the training pixels (nnU-Net's cap), at least 2;
- **epochs, patience, fold**: with ``--budget-min``, one fold trained for the whole budget with the
  cosine schedule fitted to the epochs it allows (:mod:`trainer.budget`), early stopping off. The
  machine's speed, measured in a few steps (:mod:`trainer.speed`), gives the reason an estimate of
  those epochs and says when they are few (under :data:`FEW_EPOCHS`).

The choices depend on the fingerprints alone, never on the measured speed: the machine's load of the
moment must not change what a command trains (the speed moved tenfold on a busy 2-core machine).

Explicit settings (flags or ``--config``) always win; their reason is ``given``. The choices and
reasons go into ``RUN/config.json`` under ``planned``; a rerun on the same run directory reuses them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.devices import parse_device
from network.config import UNetConfig
from trainer import rundir
from trainer.config import NETWORK_KEYS, FitOptions, FitSettings, resolve_data
from trainer.data import load_samples
from trainer.fingerprint import DataFingerprint, MachineFingerprint, data_fingerprint, machine_fingerprint
from trainer.folddata import RECALIBRATION_FRAMES
from trainer.speed import Speed, measure_speed

MIN_DEFECT_PX = 4.0
#: Fewer estimated epochs than this in the budget are pointed out (the demo's 12-epoch runs fell well short
#: of its 36-epoch run).
FEW_EPOCHS = 12
SCALES = (0.125, 0.25, 0.5, 1.0)
MIN_TRAIN_SIDE = 32
CPU_CROP = (64, 128)
CUDA_CROP = (256, 256)
CPU_BATCH = 8
CUDA_BATCH = 16
LARGE_GPU_GIB = 40.0
BATCH_DATA_FRACTION = 0.05
MIN_BATCH = 2
CPU_DEPTH = 3
MAX_DEPTH = 5
MIN_BOTTLENECK = 4
#: Without a budget: the epoch limit and patience of early stopping.
EPOCHS, PATIENCE = 150, 15
#: With a budget: the longest schedule the budget may be fitted to.
MAX_BUDGET_EPOCHS = 300
GIVEN = "given"
#: The settings the planner chooses (keys of :class:`trainer.config.FitSettings`), in the order it decides them.
PLANNED_SETTINGS = ("scale", "crop", "encoder_depth", "decoder_channels", "batch_size", "epochs", "patience")
#: The execution option it chooses (:class:`trainer.config.FitOptions`).
PLANNED_OPTIONS = ("fold",)


@dataclass(frozen=True)
class Choice:
    """One planned setting: its value and why."""

    value: Any
    reason: str


@dataclass(frozen=True)
class Plan:
    """The planner's choices, by key (:data:`PLANNED_SETTINGS` and :data:`PLANNED_OPTIONS`), and what it read."""

    choices: dict[str, Choice]
    fingerprint: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The ``planned`` block of ``RUN/config.json``."""
        choices = {k: {"value": list(c.value) if isinstance(c.value, tuple) else c.value, "reason": c.reason}
                   for k, c in self.choices.items()}
        return {"choices": choices, "fingerprint": self.fingerprint}

    def lines(self) -> list[str]:
        """One line per choice: key, value, reason."""
        width = max(len(k) for k in self.choices)
        return [f"  {k:<{width}}  {_text(c.value):<10}  {c.reason}" for k, c in self.choices.items()]


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if len(value) != 2 or not all(isinstance(v, int) for v in value) \
            else f"{value[0]}x{value[1]}"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Situation:
    """What the rules read besides the settings: the fingerprints, the budget, the split, the architecture,
    and the measured speed (None: not measured)."""

    data: DataFingerprint
    machine: MachineFingerprint
    budget_min: float | None
    folds: int
    holdout: float
    arch: str
    speed: Speed | None = None


def make_plan(situation: Situation, given: dict[str, Any]) -> Plan:
    """Chooses every :data:`PLANNED_SETTINGS` and :data:`PLANNED_OPTIONS` key not in ``given``
    (``given[key]`` is the value a flag or config file set); rules see the given values and the ones
    decided before them."""
    rules: dict[str, Callable[[Situation, dict[str, Any]], Choice]] = {
        "scale": _scale, "crop": _crop, "encoder_depth": _depth, "decoder_channels": _decoder,
        "batch_size": _batch, "epochs": _epochs, "patience": _patience, "fold": _fold,
    }
    values: dict[str, Any] = dict(given)
    choices: dict[str, Choice] = {}
    for key, rule in rules.items():
        choice = Choice(given[key], GIVEN) if key in given else rule(situation, values)
        if key == "decoder_channels" and key in given and "encoder_depth" not in given and situation.arch == "unet":
            values["encoder_depth"] = len(given[key])
            choices["encoder_depth"] = Choice(len(given[key]), "one stage per given --decoder-channels width")
        choices[key] = choice
        values[key] = choice.value
    fingerprint = {"data": situation.data.to_dict(), "machine": situation.machine.to_dict(),
                   "budget_min": situation.budget_min,
                   "speed": None if situation.speed is None else situation.speed.to_dict()}
    return Plan(choices, fingerprint)


def _train_size(s: Situation, values: dict[str, Any]) -> tuple[int, int]:
    return round(s.data.height * values["scale"]), round(s.data.width * values["scale"])


def _scale(s: Situation, values: dict[str, Any]) -> Choice:
    short = min(s.data.height, s.data.width)
    by_side = next((x for x in SCALES if short * x >= MIN_TRAIN_SIDE), 1.0)
    thinnest = s.data.thinnest()
    if thinnest is None:
        return Choice(max(0.5, by_side), "no defect pixels to measure: half resolution")
    k, width = thinnest
    by_width = next((x for x in SCALES if width * x >= MIN_DEFECT_PX), 1.0)
    scale = max(by_width, by_side)
    why = f"the thinnest common defects ({s.data.class_names[k]}: a tenth of its pixels in defects up to " \
          f"{width:g} px wide) are {width * scale:g} px wide at {scale:g}"
    if width * scale < MIN_DEFECT_PX:
        return Choice(scale, why + f": full resolution, no scale keeps them {MIN_DEFECT_PX:g} px wide")
    if by_side > by_width:
        return Choice(scale, why + f"; a smaller scale would leave a side under {MIN_TRAIN_SIDE} px")
    return Choice(scale, why + f" (>= {MIN_DEFECT_PX:g} px; the next smaller scale would not keep them so)"
                  if scale > SCALES[0] else why)


def epoch_estimate(s: Situation, scale: float, crop: tuple[int, int] | None) -> float | None:
    """Seconds of one epoch at ``scale`` with ``crop`` from the measured speed (None without one): the
    training records' steps, then validation and (with crops) the BatchNorm re-estimation on whole frames."""
    if s.speed is None:
        return None
    th, tw = round(s.data.height * scale), round(s.data.width * scale)
    train, val = _split_frames(s)
    record_px = crop[0] * crop[1] if crop else th * tw
    whole = val + (min(train, RECALIBRATION_FRAMES) if crop else 0)
    return train * record_px * s.speed.train_px_s + whole * th * tw * s.speed.infer_px_s


def _budget_epochs(s: Situation, values: dict[str, Any]) -> int | None:
    """The epochs the budget holds at the planned scale and crop by the measured speed; None without either."""
    seconds = epoch_estimate(s, values["scale"], values["crop"])
    if s.budget_min is None or seconds is None:
        return None
    from trainer.budget import epochs_for_budget

    return epochs_for_budget(s.budget_min * 60, 0.0, seconds, 0, MAX_BUDGET_EPOCHS)


def _split_frames(s: Situation) -> tuple[float, float]:
    """(training, validation) frames of one fold."""
    holdout = s.holdout / s.data.frames if s.holdout >= 1 else s.holdout
    kept = s.data.frames * (1 - holdout)
    return kept * (s.folds - 1) / s.folds, kept / s.folds


def _crop(s: Situation, values: dict[str, Any]) -> Choice:
    th, tw = _train_size(s, values)
    base = CUDA_CROP if s.machine.cuda else CPU_CROP
    area = base[0] * base[1]
    where = "CUDA" if s.machine.cuda else "CPU"
    if th * tw < 2 * area:
        return Choice(None, f"the {th}x{tw} training frame holds under twice the {where} crop's "
                            f"{base[0]}x{base[1]} pixels: whole frames")
    ch = min(th, base[0])
    cw = min(tw, max(16, area // ch // 16 * 16))
    return Choice((ch, cw), f"the {th}x{tw} training frame holds {th * tw / area:.0f}x the {where} crop's pixels: "
                            f"{ch}x{cw} crops, centred on rare classes' defects; whole frames for validation")


def _depth(s: Situation, values: dict[str, Any]) -> Choice:
    crop = values["crop"]
    side = min(crop) if crop else min(_train_size(s, values))
    fits = max(1, min(MAX_DEPTH, int(math.floor(math.log2(max(side, 1) / MIN_BOTTLENECK)))))
    if s.machine.cuda:
        return Choice(fits, f"as deep as the {side}-px input allows with the deepest features "
                            f">= {MIN_BOTTLENECK} px (at most {MAX_DEPTH})")
    depth = min(CPU_DEPTH, fits)
    if depth < CPU_DEPTH:
        return Choice(depth, f"the {side}-px input leaves the deepest features {MIN_BOTTLENECK} px at {depth} stages")
    return Choice(depth, f"a CPU: the measured ResNet-18 cut to {CPU_DEPTH} stages trains several times more "
                         "epochs in a budget than the full encoder")


def _decoder(s: Situation, values: dict[str, Any]) -> Choice:
    depth = values["encoder_depth"]
    if s.arch != "unet":
        return Choice(None, f"{s.arch}: its own default widths")
    if s.machine.cuda:
        from network.config import default_decoder_channels

        return Choice(tuple(default_decoder_channels(depth)), "CUDA: the default U-Net widths")
    widths = tuple(8 * 2 ** (depth - 1 - i) for i in range(depth))
    return Choice(widths, "a CPU: the measured narrow decoder (32,16,8 for 3 stages)")


def _batch(s: Situation, values: dict[str, Any]) -> Choice:
    memory = s.machine.gpu_memory_gib or 0.0
    base = (2 * CUDA_BATCH if memory >= LARGE_GPU_GIB else CUDA_BATCH) if s.machine.cuda else CPU_BATCH
    th, tw = _train_size(s, values)
    crop = values["crop"]
    record_px = crop[0] * crop[1] if crop else th * tw
    train_frames, _ = _split_frames(s)
    cap = max(MIN_BATCH, int(BATCH_DATA_FRACTION * train_frames * th * tw / record_px))
    where = f"CUDA with {memory:g} GiB" if s.machine.cuda else "a CPU (the measured recipe)"
    if cap < base:
        return Choice(cap, f"{train_frames:.0f} training frames: a batch covers at most "
                           f"{BATCH_DATA_FRACTION:.0%} of the training pixels (at least {MIN_BATCH})")
    return Choice(base, f"{where}")


def _epochs(s: Situation, values: dict[str, Any]) -> Choice:
    if s.budget_min is None:
        return Choice(EPOCHS, f"no --budget-min: at most {EPOCHS}, early stopping ends it")
    estimate = _budget_epochs(s, values)
    if estimate is not None:
        few = " (few: a longer --budget-min or a smaller --scale trains more)" if estimate < FEW_EPOCHS else ""
        return Choice(MAX_BUDGET_EPOCHS, f"at most; the {s.budget_min:g}-min budget holds about {estimate} epoch{'s' * (estimate != 1)} "
                                         f"by the speed measured now{few}: the cosine schedule is fitted to the "
                                         "first epoch's measured time and re-fitted if it changes")
    return Choice(MAX_BUDGET_EPOCHS, f"at most; the cosine schedule is fitted to the epochs the {s.budget_min:g}-min "
                                     "budget holds, from the first epoch's measured time (re-fitted if it changes)")


def _patience(s: Situation, values: dict[str, Any]) -> Choice:
    if s.budget_min is None:
        return Choice(PATIENCE, f"early stopping after {PATIENCE} epochs without a lower validation loss")
    return Choice(values["epochs"], "early stopping off: the schedule runs to the budget's end; the epoch with the "
                                    "lowest validation loss is kept")


def _fold(s: Situation, values: dict[str, Any]) -> Choice:
    if s.budget_min is None:
        return Choice(None, "every fold")
    return Choice(0, "one fold gets the whole budget (one fold trained 3x longer beat 3 folds of the same time "
                     "on the synthetic strips, benchmarks/RESULTS.md); --fold K trains another")


def apply(plan: Plan, settings: Any, options: Any) -> tuple[Any, Any]:
    """``settings`` (:class:`trainer.config.FitSettings`) and ``options`` (:class:`trainer.config.FitOptions`)
    with the plan's values."""
    values = {k: plan.choices[k].value for k in PLANNED_SETTINGS if k in plan.choices}
    fold = plan.choices["fold"].value if "fold" in plan.choices else options.fold
    return dataclasses.replace(settings, **values), dataclasses.replace(options, fold=fold)


def recorded_plan(config_path: Path, given: dict[str, Any]) -> Plan | None:
    """The plan of the run ``config_path`` pins (``RUN/config.json``), with ``given`` values winning; None
    when there is no such file. A run written before the planner has no reasons: its recorded values count.
    A planned fold is reused, a given one is not."""
    if not config_path.is_file():
        return None
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # trainer.rundir.check_or_write_config reports the broken file
    block = saved.get("planned") or {}
    recorded = block.get("choices", {})
    choices = {}
    for key in (*PLANNED_SETTINGS, *PLANNED_OPTIONS):
        if key in given:
            choices[key] = Choice(given[key], GIVEN)
        elif key in recorded and not (key in PLANNED_OPTIONS and recorded[key]["reason"] == GIVEN):
            # A fold given to one invocation is that invocation's (another trains another fold).
            choices[key] = Choice(_tupled(recorded[key]["value"]), recorded[key]["reason"] + " (recorded plan)")
        elif key in saved:
            choices[key] = Choice(_tupled(saved[key]), f"recorded in {config_path}")
    return Plan(choices, block.get("fingerprint", {}))


def _tupled(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def plan_fit(settings: FitSettings, options: FitOptions, given: dict[str, Any]) -> tuple[FitSettings, FitOptions, Plan]:
    """Plans a ``trainer fit``: the recorded plan when ``options.out`` already holds the run (and no
    ``--restart``), else a new one from the data's and this machine's fingerprints.

    Raises:
        ValueError, FileNotFoundError: as :func:`trainer.config.resolve` and :func:`trainer.data.load_samples`.
    """
    plan = None if options.restart else recorded_plan(Path(options.out) / rundir.CONFIG, given)
    if plan is None:
        data, frames = resolve_data(settings)
        device = _torch_device(options.device)
        samples = load_samples([Path(p) for p in data], frames)
        if not samples:
            raise ValueError(f"no images found in {', '.join(data)}")
        situation = Situation(data=data_fingerprint(samples, frames, settings.seed),
                              machine=machine_fingerprint(device.index if device.type == "cuda" else None),
                              budget_min=settings.budget_min, folds=settings.folds, holdout=settings.holdout,
                              arch=settings.arch)
        plan = make_plan(situation, given)
        if settings.budget_min is not None:
            # How many epochs each scale leaves: the planned network's speed, then the plan again with it.
            speed = measure_speed(_network(apply(plan, settings, options)[0]), device)
            plan = make_plan(dataclasses.replace(situation, speed=speed), given)
    settings, options = apply(plan, settings, options)
    return settings, options, plan


def _network(settings: FitSettings) -> UNetConfig:
    from network.config import default_decoder_channels

    decoder = settings.decoder_channels or default_decoder_channels(settings.encoder_depth)
    return UNetConfig(**{k: getattr(settings, k) for k in NETWORK_KEYS} | {"decoder_channels": tuple(decoder)})


def _torch_device(device: str) -> torch.device:
    """The device this process will train on (``--device``; ``auto`` = CUDA when available; under torchrun
    its LOCAL_RANK's GPU). CUDA asked for but missing plans for the CPU: :func:`trainer.distributed.
    setup_distributed` then refuses it with its message."""
    parsed = parse_device(device, "--device")
    if parsed.kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", parsed.index or 0)))



def fingerprint_lines(plan: Plan) -> list[str]:
    """What the planner read, in two lines (empty for a recorded plan without a fingerprint)."""
    data, machine = plan.fingerprint.get("data"), plan.fingerprint.get("machine")
    if not data or not machine:
        return []
    classes = ", ".join(
        f"{name} {c['frequency']:.0%}" + (f" ({c['width_p10']:g} px)" if c["width_p10"] is not None else "")
        for name, c in zip(data["class_names"], data["classes"]))
    where = f"CUDA {machine['gpu']} ({machine['gpu_memory_gib']:g} GiB)" if machine["cuda"] else "CPU"
    return [f"data: {data['frames']} frames of {data['height']}x{data['width']}; classes in frames (thin-defect "
            f"width): {classes}",
            f"machine: {machine['cores']} cores, {machine['cpu']}{' (bf16)' if machine['cpu_bf16'] else ''}; "
            f"trains on the {where}{_speed_text(plan.fingerprint.get('speed'))}"]


def _speed_text(speed: dict[str, float] | None) -> str:
    if not speed:
        return ""
    return (f"; measured {1e-6 / speed['train_px_s']:.2f} Mpx/s training, {1e-6 / speed['infer_px_s']:.2f} Mpx/s "
            "inference (the machine's load included)")
