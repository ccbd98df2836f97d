"""The training run's configuration: a typed dataclass filled from defaults, a YAML/JSON file and flags.

Precedence: dataclass defaults < ``--config FILE`` < command-line flags. Unknown keys in the file
are an error naming the key and the file. :func:`resolve` fills what the data decides (frame
size, normalisation) and checks the combination, so ``RUN/config.json`` holds every value the run
actually used, and a second ``trainer fit`` on the same run directory can compare against it.

:class:`FitConfig` is what defines a run's result; :class:`FitOptions` is how this invocation
executes it (device, workers, which fold), which may differ between invocations of one run
(fold 0 on one GPU, fold 1 on another, a resume on a different machine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.devices import parse_device

log = logging.getLogger(__name__)

LOSSES = ("bce", "bce+dice")
ENCODER_WEIGHTS = ("none", "imagenet")
LR_SCHEDULES = ("none", "plateau", "cosine")
#: ``--augment`` levels (see :mod:`trainer.augment_random`).
AUGMENT_LEVELS = ("none", "light", "strong")
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)
#: Training frames ``trainer export`` samples for a model's drift reference (:mod:`trainer.drift_reference`).
DEFAULT_DRIFT_FRAMES = 256
# Grayscale equivalents of the ImageNet RGB statistics (means of the three channels): what a
# pretrained encoder's first layer expects once smp folds its RGB filters into one channel.
IMAGENET_GRAY_MEAN = 0.449
IMAGENET_GRAY_STD = 0.226


@dataclass
class FitConfig:
    """Everything that defines a training run's result (written to ``RUN/config.json``).

    Defaults are the thesis' protocol (U-Net/ResNet-34, half resolution, Adam 1e-3, BCE, batch 16,
    150 epochs with patience 15, 5 folds, balanced training folds), plus ``prior_init``: the
    segmentation head's bias starts at each class's defect-pixel prior (as in RetinaNet), so early
    epochs do not go into learning that ~99 % of pixels are background. ``None`` values are
    resolved from the data by :func:`resolve`.
    """

    data: list[str] = field(default_factory=list)
    arch: str = "unet"
    gate: bool = False
    gate_pooling: str = "max"
    encoder: str = "resnet34"
    encoder_weights: str = "imagenet"
    freeze_encoder: bool = False
    in_channels: int = 1
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] | None = None
    num_classes: int = 4
    class_names: tuple[str, ...] | None = None
    height: int | None = None
    width: int | None = None
    scale: float = 0.5
    folds: int = 5
    holdout: float = 0.1
    folds_file: str | None = None
    epochs: int = 150
    patience: int = 15
    batch_size: int = 16
    lr: float = 1e-3
    lr_schedule: str = "none"
    loss: str = "bce"
    pos_weight: tuple[float, ...] | None = None
    balance: bool = True
    augment: str = "none"
    crop: tuple[int, ...] | None = None
    crop_defect_p: float = 0.7  # probability that a crop centres on a defect (trainer.crops.CropSampler)
    balance_target: int | None = None
    prior_init: bool = True
    mean: float | None = None
    std: float | None = None
    amp: bool = True
    seed: int = 0

    @property
    def holdout_count_or_fraction(self) -> float | int:
        """``holdout`` as the splitter takes it: a fraction below 1, else a whole number of images."""
        return self.holdout if self.holdout < 1 else int(self.holdout)

    @property
    def train_size(self) -> tuple[int, int]:
        if self.height is None or self.width is None:
            raise ValueError("the frame size is not resolved yet (call resolve())")
        return round(self.height * self.scale), round(self.width * self.scale)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> FitConfig:
        return cls(**_coerce(cls, data, source))


@dataclass
class FitOptions:
    """How this invocation runs a training run (not part of its identity)."""

    out: str = ""
    fold: int | None = None
    device: str = "auto"
    workers: int = 2
    restart: bool = False
    progress: bool | None = None  # progress bars: None = only on a terminal


# --------------------------------------------------------------------------- coercion


def _field_types(cls: type) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def _coerce_value(key: str, kind: str, value: Any, source: str) -> Any:
    """Converts a JSON/YAML/flag value to the field's type, or raises naming the key and source."""
    if value is None:
        if "None" in kind:
            return None
        raise ValueError(f"{source}: {key} must not be null")
    try:
        if kind.startswith("tuple[int") or kind.startswith("tuple[float") or kind.startswith("tuple[str"):
            item = {"int": int, "float": float, "str": str}[kind[6:].split(",")[0].split("]")[0]]
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise TypeError("expected a list")
            return tuple(item(v) for v in value)
        if kind.startswith("list[str]"):
            if isinstance(value, str):
                value = [value]
            return [str(v) for v in value]
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError("expected true or false")
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError("expected an integer")
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise TypeError("expected a number")
            return float(value)
        if kind.startswith("str"):
            if not isinstance(value, (str, int, float)):
                raise TypeError("expected a string")
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {key}={value!r} is not a valid {kind} ({exc})") from None
    raise AssertionError(f"unhandled field type {kind} for {key}")


def _coerce(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    types = _field_types(cls)
    out = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in types:
            raise ValueError(f"{source}: unknown key {raw_key!r}; known keys: {', '.join(sorted(types))}")
        out[key] = _coerce_value(key, types[key], value, source)
    return out


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a YAML or JSON config file into (FitConfig values, FitOptions values).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unparsable file, not a mapping, an unknown key (named), or a mistyped value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - json and yaml raise different types
        raise ValueError(f"config file {path} cannot be parsed: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    config_keys = _field_types(FitConfig)
    option_keys = _field_types(FitOptions)
    config_part, option_part = {}, {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in config_keys:
            config_part[name] = value
        elif name in option_keys:
            option_part[name] = value
        else:
            known = sorted(set(config_keys) | set(option_keys))
            raise ValueError(f"config file {path}: unknown key {key!r}; known keys: {', '.join(known)}")
    return _coerce(FitConfig, config_part, f"config file {path}"), _coerce(FitOptions, option_part, f"config file {path}")


def build(file_values: dict[str, Any], flag_values: dict[str, Any]) -> tuple[FitConfig, FitOptions]:
    """Merges defaults < file < flags into (FitConfig, FitOptions); flags carry only what was given."""
    config_keys = set(_field_types(FitConfig))
    merged_config: dict[str, Any] = {}
    merged_options: dict[str, Any] = {}
    for values in (file_values, flag_values):
        for key, value in values.items():
            (merged_config if key in config_keys else merged_options)[key] = value
    cfg = FitConfig.from_dict(merged_config, "flags")
    options = FitOptions(**_coerce(FitOptions, merged_options, "flags"))
    parse_device(options.device, "--device")  # the one parser of device strings; cuda:N included
    return cfg, options


# --------------------------------------------------------------------------- resolution


def _frame_size_from_data(data_dir: Path) -> tuple[int, int]:
    """(height, width) most images in ``DIR/train_images`` declare (an odd one is reported by the image check)."""
    from trainer.imagecheck import frame_size

    return frame_size(data_dir)


def resolve(cfg: FitConfig) -> FitConfig:
    """Fills data-derived values and checks the combination; returns a new, fully resolved config.

    Raises:
        ValueError: an impossible combination, naming the flags involved.
        FileNotFoundError: a data folder or its images are missing.
    """
    from engine.metadata import DEFAULT_CLASS_NAMES

    if not cfg.data:
        raise ValueError("no training data: give --data DIR (repeat it to train on several folders together)")
    data = [str(Path(d).expanduser().resolve()) for d in cfg.data]
    for d in data:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--data {d}: no such data folder")
    height, width = cfg.height, cfg.width
    if height is None or width is None:
        found = _frame_size_from_data(Path(data[0]))
        height = found[0] if height is None else height
        width = found[1] if width is None else width
    _check_choices(cfg)
    decoder = cfg.decoder_channels or DEFAULT_DECODER_CHANNELS[: cfg.encoder_depth]
    if len(decoder) != cfg.encoder_depth:
        raise ValueError(
            f"--decoder-channels has {len(decoder)} entries, expected one per encoder stage "
            f"(--encoder-depth {cfg.encoder_depth})"
        )
    c = cfg.num_classes
    if c < 1:
        raise ValueError(f"--classes must be >= 1, got {c}")
    names = cfg.class_names or (
        DEFAULT_CLASS_NAMES if c == len(DEFAULT_CLASS_NAMES) else tuple(f"class {k}" for k in range(1, c + 1))
    )
    if len(names) != c:
        raise ValueError(f"class_names has {len(names)} names, expected one per class ({c})")
    _check_numbers(cfg)
    mean, std = cfg.mean, cfg.std
    if mean is None:
        mean = IMAGENET_GRAY_MEAN if cfg.encoder_weights == "imagenet" else 0.0
    if std is None:
        std = IMAGENET_GRAY_STD if cfg.encoder_weights == "imagenet" else 1.0
    if not std > 0:
        raise ValueError(f"--std must be > 0, got {std}")
    folds_file = cfg.folds_file
    if folds_file is not None:
        folds_file = str(Path(folds_file).expanduser().resolve())
    resolved = dataclasses.replace(
        cfg, data=data, height=int(height), width=int(width), decoder_channels=tuple(int(v) for v in decoder),
        class_names=tuple(names), mean=float(mean), std=float(std), folds_file=folds_file,
    )
    th, tw = resolved.train_size
    if th < 1 or tw < 1:
        raise ValueError(f"--scale {cfg.scale} shrinks {height}x{width} frames to {th}x{tw}; pick a larger --scale")
    if cfg.crop is not None and (len(cfg.crop) != 2 or not 1 <= cfg.crop[0] <= th or not 1 <= cfg.crop[1] <= tw):
        raise ValueError(f"--crop {'x'.join(map(str, cfg.crop))} must be HxW within the training size {th}x{tw} "
                         f"(--scale {cfg.scale} of {height}x{width} frames)")
    stride = 2**cfg.encoder_depth
    if th % stride or tw % stride:
        # engine.model.padded_logits pads to the stride and crops back, in training and in the graph.
        log.info("training at %dx%d, padded to multiples of %d for the network (--encoder-depth %d)", th, tw, stride,
                 cfg.encoder_depth)
    return resolved


def _check_choices(cfg: FitConfig) -> None:
    """The named choices (encoder, weights, loss, schedule, depth)."""
    from engine.model import ENCODERS

    if cfg.encoder not in ENCODERS:
        raise ValueError(f"--encoder {cfg.encoder!r} is not supported; choose one of {', '.join(ENCODERS)}")
    from engine.metadata import ARCHS, GATE_POOLING

    if cfg.arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    if cfg.arch == "fpn" and not 3 <= cfg.encoder_depth <= 5:
        raise ValueError(f"--arch fpn needs --encoder-depth 3..5, got {cfg.encoder_depth}")
    if cfg.gate_pooling not in GATE_POOLING:
        raise ValueError(f"--gate-pooling must be one of {', '.join(GATE_POOLING)}, got {cfg.gate_pooling!r}")
    if cfg.encoder_weights not in ENCODER_WEIGHTS:
        raise ValueError(f"--encoder-weights must be one of {', '.join(ENCODER_WEIGHTS)}, got {cfg.encoder_weights!r}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    if cfg.augment not in AUGMENT_LEVELS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENT_LEVELS)}, got {cfg.augment!r}")
    if not 1 <= cfg.encoder_depth <= 5:
        raise ValueError(f"--encoder-depth must be 1..5, got {cfg.encoder_depth}")


def _check_numbers(cfg: FitConfig) -> None:
    """Per-class weights and the numeric ranges."""
    c = cfg.num_classes
    if cfg.pos_weight is not None and (len(cfg.pos_weight) != c or any(w <= 0 for w in cfg.pos_weight)):
        raise ValueError(f"--pos-weight needs {c} positive numbers (one per class), got {list(cfg.pos_weight)}")
    for name, value, low in (("--epochs", cfg.epochs, 1), ("--patience", cfg.patience, 1),
                             ("--batch-size", cfg.batch_size, 1), ("--folds", cfg.folds, 2),
                             ("--in-channels", cfg.in_channels, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.crop_defect_p <= 1:
        raise ValueError(f"--crop-defect-p must be in [0, 1], got {cfg.crop_defect_p}")
    if not 0 < cfg.scale <= 1:
        raise ValueError(f"--scale must be in (0, 1], got {cfg.scale}")
    if cfg.holdout < 0 or (cfg.holdout >= 1 and not float(cfg.holdout).is_integer()):
        raise ValueError(f"--holdout is a fraction in [0, 1) or a whole number of images, got {cfg.holdout}")
    if cfg.freeze_encoder and cfg.encoder_weights == "none":
        log.warning("--freeze-encoder with --encoder-weights none trains the decoder on a random, frozen encoder")


def differences(saved: dict[str, Any], current: FitConfig) -> list[str]:
    """Human-readable ``key: saved -> current`` lines where a saved run config differs."""
    now = current.to_dict()
    defaults = FitConfig().to_dict()
    lines = []
    for key in sorted(set(saved) | set(now)):
        if key not in saved and key in defaults and now.get(key) == defaults[key]:
            continue  # a setting added since the run was made, at the value it had before it existed
        if saved.get(key, "<absent>") != now.get(key, "<absent>"):
            lines.append(f"{key}: {saved.get(key, '<absent>')!r} -> {now.get(key, '<absent>')!r}")
    return lines
