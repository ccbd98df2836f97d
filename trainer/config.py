"""The training run's configuration: settings from defaults, a YAML/JSON file and flags, resolved into
one typed :class:`FitConfig`.

Precedence: dataclass defaults < ``--config FILE`` < command-line flags, into :class:`FitSettings`
(flat, the keys of flags, files and ``RUN/config.json``; unknown keys are an error naming the key
and the file). :func:`resolve` fills what the data decides (frame size, normalisation, class
names) and composes :class:`FitConfig`: the network's configuration (``network.config.UNetConfig``,
its one validator), the data's (:class:`trainer.samples.DataConfig`), the optimiser's
(:class:`OptimConfig`) and the run's own settings. ``RUN/config.json`` holds its flat form, every
value the run used, so a second ``trainer fit`` on the same run directory can compare against it.

:class:`FitOptions` is how this invocation executes the run (device, workers, which fold), which
may differ between invocations of one run (fold 0 on one GPU, fold 1 on another, a resume elsewhere).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.decision import default_min_areas, default_thresholds
from engine.devices import parse_device
from engine.metadata import ModelMetadata
from network.config import UNetConfig, default_decoder_channels
from trainer.imagecheck import frame_size
from trainer.samples import DataConfig

log = logging.getLogger(__name__)

LOSSES = ("bce", "bce+dice")
ENCODER_WEIGHTS = ("none", "imagenet")
LR_SCHEDULES = ("none", "plateau", "cosine")
#: ``--augment`` levels (see :mod:`trainer.augment_random`).
AUGMENT_LEVELS = ("none", "light", "strong")
#: Training frames ``trainer export`` samples for a model's drift reference (:mod:`trainer.drift_reference`).
DEFAULT_DRIFT_FRAMES = 256
# Grayscale equivalents of the ImageNet RGB statistics (means of the three channels): what a
# pretrained encoder's first layer expects once smp folds its RGB filters into one channel.
IMAGENET_GRAY_MEAN = 0.449
IMAGENET_GRAY_STD = 0.226
#: The keys of ``RUN/config.json`` that are the network's (:class:`network.config.UNetConfig`) and the optimiser's.
NETWORK_KEYS = ("encoder", "in_channels", "num_classes", "encoder_depth", "decoder_channels", "arch", "gate",
                "gate_pooling")
OPTIM_KEYS = ("epochs", "patience", "batch_size", "lr", "lr_schedule", "loss", "pos_weight", "amp")
#: What a ``RUN/config.json`` written before a key existed meant by its absence, where the key's default
#: has changed since (the measured recipe became the default): such a run trained with the old behaviour.
BEFORE_KEY_EXISTED: dict[str, Any] = {"augment": "none", "lr_schedule": "none"}
#: The key of ``RUN/config.json`` that holds the planner's choices and reasons (:mod:`trainer.plan`); not a setting.
PLANNED_KEY = "planned"


@dataclass
class FitSettings:
    """A training run's settings as given: flags, a config file, or ``RUN/config.json`` (flat keys).

    Defaults are the recipe the measurements support (``benchmarks/RESULTS.md``, ``docs/training.md``):
    a ResNet-18 U-Net cut to 3 encoder stages from random weights, BCE+Dice, class balancing, output-prior
    initialisation, light augmentation, Adam 4e-3 with the cosine schedule, batch 8, half resolution,
    up to 150 epochs with patience 15, 5 folds. ``trainer fit`` plans the data- and machine-dependent
    ones (scale, crop, batch, depth, decoder widths, epochs: :mod:`trainer.plan`) unless they are given.
    ``None`` values are resolved from the data by :func:`resolve`.
    """

    data: list[str] = field(default_factory=list)
    arch: str = "unet"
    gate: bool = False
    gate_pooling: str = "max"
    encoder: str = "resnet18"
    encoder_weights: str = "none"
    freeze_encoder: bool = False
    in_channels: int = 1
    encoder_depth: int = 3
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
    batch_size: int = 8
    lr: float = 4e-3
    lr_schedule: str = "cosine"
    loss: str = "bce+dice"
    pos_weight: tuple[float, ...] | None = None
    balance: bool = True
    augment: str = "light"
    crop: tuple[int, ...] | None = None
    crop_defect_p: float = 0.7  # probability that a crop centres on a defect (trainer.crops.CropSampler)
    balance_target: int | None = None
    prior_init: bool = True
    mean: float | None = None
    std: float | None = None
    amp: bool | None = None  # None: on for CUDA, off on CPUs (see trainer.loop.amp_dtype)
    seed: int = 0
    budget_min: float | None = None  # wall-clock minutes for the folds' epochs (trainer.budget)

    def to_dict(self) -> dict[str, Any]:
        """The flat form; ``budget_min`` only when set (a run without a budget writes what it wrote before
        budgets existed)."""
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        if d["budget_min"] is None:
            del d["budget_min"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> FitSettings:
        """Settings from their flat form; a run's ``planned`` block (the plan's reasons) is not a setting."""
        return cls(**_coerce(cls, {k: v for k, v in data.items() if k != PLANNED_KEY}, source))


@dataclass(frozen=True)
class OptimConfig:
    """How each fold is optimised: Adam at ``lr`` (with ``lr_schedule``), ``loss``, early stopping."""

    epochs: int = 150
    patience: int = 15
    batch_size: int = 8
    lr: float = 4e-3
    lr_schedule: str = "cosine"
    loss: str = "bce+dice"
    pos_weight: tuple[float, ...] | None = None
    amp: bool | None = None


@dataclass(frozen=True)
class FitConfig:
    """Everything that defines a training run's result, resolved (``RUN/config.json`` is its flat form).

    Attributes:
        network: the U-Net/FPN every fold builds.
        frames: the data's classes and camera frame size.
        optim: the optimiser, loss, schedule and early stopping.
        data: the data folders (absolute paths).
        The rest: encoder initialisation, training scale, split, balancing, augmentation, crops,
        input normalisation and seed (see :class:`FitSettings` and ``trainer fit --help``).
    """

    network: UNetConfig
    frames: DataConfig
    optim: OptimConfig
    data: list[str]
    encoder_weights: str
    freeze_encoder: bool
    scale: float
    folds: int
    holdout: float
    folds_file: str | None
    balance: bool
    augment: str
    crop: tuple[int, ...] | None
    crop_defect_p: float
    balance_target: int | None
    prior_init: bool
    mean: float
    std: float
    seed: int
    budget_min: float | None = None

    @property
    def holdout_count_or_fraction(self) -> float | int:
        """``holdout`` as the splitter takes it: a fraction below 1, else a whole number of images."""
        return self.holdout if self.holdout < 1 else int(self.holdout)

    @property
    def train_size(self) -> tuple[int, int]:
        return round(self.frames.height * self.scale), round(self.frames.width * self.scale)

    def metadata(self) -> ModelMetadata:
        """What :func:`network.processing.preprocess` needs, as the exported graph will carry it (default decision rule)."""
        c, (th, tw) = self.frames.num_classes, self.train_size
        return ModelMetadata(
            num_classes=c, class_names=list(self.frames.class_names), input_height=self.frames.height,
            input_width=self.frames.width, train_height=th, train_width=tw, thresholds=default_thresholds(c),
            min_areas=default_min_areas(c), encoder=self.network.encoder, in_channels=self.network.in_channels,
            mean=self.mean, std=self.std,
        )

    def to_dict(self) -> dict[str, Any]:
        """The flat form ``RUN/config.json`` holds (the keys of :class:`FitSettings`)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("network", "frames", "optim")}
        values |= {k: getattr(self.network, k) for k in NETWORK_KEYS}
        values |= {k: getattr(self.optim, k) for k in OPTIM_KEYS}
        values |= {"class_names": self.frames.class_names, "height": self.frames.height, "width": self.frames.width}
        return FitSettings(**values).to_dict()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> FitConfig:
        """A resolved config from its flat form (a run's ``config.json``, old runs' included).

        Raises:
            ValueError: an unknown key or mistyped value, or a value left unresolved, naming ``source``.
        """
        settings = FitSettings.from_dict({**BEFORE_KEY_EXISTED, **data}, source)
        unresolved = [k for k in ("height", "width", "mean", "std") if getattr(settings, k) is None]
        if unresolved:
            raise ValueError(f"{source}: {', '.join(unresolved)} not resolved (was it written by 'trainer fit'?)")
        return _compose(settings)


@dataclass
class FitOptions:
    """How this invocation runs a training run (not part of its identity)."""

    out: str = ""
    fold: int | None = None
    device: str = "auto"
    workers: int = 2
    restart: bool = False
    progress: bool | None = None  # progress bars: None = only on a terminal


def _compose(s: FitSettings) -> FitConfig:
    """The typed parts of resolved settings; the network's and the data's records check their own values."""
    decoder = s.decoder_channels or default_decoder_channels(s.encoder_depth)
    network = UNetConfig(**{k: getattr(s, k) for k in NETWORK_KEYS} | {"decoder_channels": tuple(decoder)})
    frames = DataConfig(num_classes=s.num_classes, height=int(s.height), width=int(s.width),
                        class_names=s.class_names)
    optim = OptimConfig(**{k: getattr(s, k) for k in OPTIM_KEYS})
    rest = {k: getattr(s, k) for k in ("data", "encoder_weights", "freeze_encoder", "scale", "folds", "holdout",
                                       "folds_file", "balance", "augment", "crop", "crop_defect_p",
                                       "balance_target", "prior_init", "seed", "budget_min")}
    return FitConfig(network=network, frames=frames, optim=optim, mean=float(s.mean), std=float(s.std), **rest)


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
    """Reads a YAML or JSON config file into (FitSettings values, FitOptions values).

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
            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - json and yaml raise different types
        raise ValueError(f"config file {path} cannot be parsed: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    config_keys = _field_types(FitSettings)
    option_keys = _field_types(FitOptions)
    config_part, option_part = {}, {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == PLANNED_KEY:
            continue  # a run's config.json given as --config: its values are in the flat keys
        if name in config_keys:
            config_part[name] = value
        elif name in option_keys:
            option_part[name] = value
        else:
            known = sorted(set(config_keys) | set(option_keys))
            raise ValueError(f"config file {path}: unknown key {key!r}; known keys: {', '.join(known)}")
    return _coerce(FitSettings, config_part, f"config file {path}"), _coerce(FitOptions, option_part, f"config file {path}")


def build(file_values: dict[str, Any], flag_values: dict[str, Any]) -> tuple[FitSettings, FitOptions]:
    """Merges defaults < file < flags into (FitSettings, FitOptions); flags carry only what was given."""
    config_keys = set(_field_types(FitSettings))
    merged_config: dict[str, Any] = {}
    merged_options: dict[str, Any] = {}
    for values in (file_values, flag_values):
        for key, value in values.items():
            (merged_config if key in config_keys else merged_options)[key] = value
    cfg = FitSettings.from_dict(merged_config, "flags")
    options = FitOptions(**_coerce(FitOptions, merged_options, "flags"))
    parse_device(options.device, "--device")  # the one parser of device strings; cuda:N included
    return cfg, options


# --------------------------------------------------------------------------- resolution


def resolve(settings: FitSettings) -> FitConfig:
    """Fills data-derived values, checks the combination and composes the run's :class:`FitConfig`.

    Raises:
        ValueError: an impossible combination, naming the flags involved.
        FileNotFoundError: a data folder or its images are missing.
    """
    _check_choices(settings)
    _check_numbers(settings)
    data, frames = resolve_data(settings)
    height, width = frames.size
    pretrained = settings.encoder_weights == "imagenet"
    mean = settings.mean if settings.mean is not None else (IMAGENET_GRAY_MEAN if pretrained else 0.0)
    std = settings.std if settings.std is not None else (IMAGENET_GRAY_STD if pretrained else 1.0)
    if not std > 0:
        raise ValueError(f"--std must be > 0, got {std}")
    folds_file = None if settings.folds_file is None else str(Path(settings.folds_file).expanduser().resolve())
    cfg = _compose(dataclasses.replace(settings, data=data, height=int(height), width=int(width), mean=float(mean),
                                       std=float(std), folds_file=folds_file))
    _check_sizes(cfg)
    return cfg


def resolve_data(settings: FitSettings) -> tuple[list[str], DataConfig]:
    """The data folders (absolute) and what their frames look like: the part of :func:`resolve` that the
    planner and the image check need before the rest is decided.

    Raises:
        FileNotFoundError: a data folder or its images are missing.
        ValueError: no data folder, or class names that do not match the classes.
    """
    data = _data_dirs(settings)
    height, width = settings.height, settings.width
    if height is None or width is None:
        found = frame_size(Path(data[0]))
        height = found[0] if height is None else height
        width = found[1] if width is None else width
    return data, DataConfig(num_classes=settings.num_classes, height=int(height), width=int(width),
                            class_names=settings.class_names)


def _data_dirs(settings: FitSettings) -> list[str]:
    if not settings.data:
        raise ValueError("no training data: give --data DIR (repeat it to train on several folders together)")
    data = [str(Path(d).expanduser().resolve()) for d in settings.data]
    for d in data:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--data {d}: no such data folder")
    return data


def _check_choices(s: FitSettings) -> None:
    """The trainer's own named choices; the network's (encoder, arch, pooling, widths) are
    :class:`network.config.UNetConfig`'s to check."""
    if s.encoder_weights not in ENCODER_WEIGHTS:
        raise ValueError(f"--encoder-weights must be one of {', '.join(ENCODER_WEIGHTS)}, got {s.encoder_weights!r}")
    if s.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {s.loss!r}")
    if s.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {s.lr_schedule!r}")
    if s.augment not in AUGMENT_LEVELS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENT_LEVELS)}, got {s.augment!r}")


def _check_numbers(s: FitSettings) -> None:
    """Per-class weights and the numeric ranges."""
    c = s.num_classes
    if s.pos_weight is not None and (len(s.pos_weight) != c or any(w <= 0 for w in s.pos_weight)):
        raise ValueError(f"--pos-weight needs {c} positive numbers (one per class), got {list(s.pos_weight)}")
    for name, value, low in (("--epochs", s.epochs, 1), ("--patience", s.patience, 1),
                             ("--batch-size", s.batch_size, 1), ("--folds", s.folds, 2),
                             ("--in-channels", s.in_channels, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not s.lr > 0:
        raise ValueError(f"--lr must be > 0, got {s.lr}")
    if s.budget_min is not None and not s.budget_min > 0:
        raise ValueError(f"--budget-min must be > 0 minutes, got {s.budget_min}")
    if not 0 <= s.crop_defect_p <= 1:
        raise ValueError(f"--crop-defect-p must be in [0, 1], got {s.crop_defect_p}")
    if not 0 < s.scale <= 1:
        raise ValueError(f"--scale must be in (0, 1], got {s.scale}")
    if s.holdout < 0 or (s.holdout >= 1 and not float(s.holdout).is_integer()):
        raise ValueError(f"--holdout is a fraction in [0, 1) or a whole number of images, got {s.holdout}")
    if s.freeze_encoder and s.encoder_weights == "none":
        log.warning("--freeze-encoder with --encoder-weights none trains the decoder on a random, frozen encoder")


def _check_sizes(cfg: FitConfig) -> None:
    """The training size the scale leaves, and the crop within it."""
    height, width = cfg.frames.size
    th, tw = cfg.train_size
    if th < 1 or tw < 1:
        raise ValueError(f"--scale {cfg.scale} shrinks {height}x{width} frames to {th}x{tw}; pick a larger --scale")
    if cfg.crop is not None and (len(cfg.crop) != 2 or not 1 <= cfg.crop[0] <= th or not 1 <= cfg.crop[1] <= tw):
        raise ValueError(f"--crop {'x'.join(map(str, cfg.crop))} must be HxW within the training size {th}x{tw} "
                         f"(--scale {cfg.scale} of {height}x{width} frames)")
    stride = 2**cfg.network.encoder_depth
    if th % stride or tw % stride:
        # network.processing.padded_logits pads to the stride and crops back, in training and in the graph.
        log.info("training at %dx%d, padded to multiples of %d for the network (--encoder-depth %d)", th, tw, stride,
                 cfg.network.encoder_depth)


def differences(saved: dict[str, Any], current: FitConfig) -> list[str]:
    """Human-readable ``key: saved -> current`` lines where a saved run config differs."""
    now = current.to_dict()
    defaults = FitSettings().to_dict()
    lines = []
    for key in sorted((set(saved) | set(now)) - {PLANNED_KEY}):
        if key not in saved and key in defaults and now.get(key) == BEFORE_KEY_EXISTED.get(key, defaults[key]):
            continue  # a setting added since the run was made, at the value it had before it existed
        if saved.get(key, "<absent>") != now.get(key, "<absent>"):
            lines.append(f"{key}: {saved.get(key, '<absent>')!r} -> {now.get(key, '<absent>')!r}")
    return lines
