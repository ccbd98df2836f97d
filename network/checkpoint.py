"""Fold checkpoints and ensemble bundles: their formats, and reading and writing them.

A fold checkpoint (``RUN/fold<k>/best.pt``, ``last.pt``) holds the network's config
(:class:`network.config.UNetConfig` as a dict), its state dict, a :class:`FoldFacts` record (what
a model made of this fold needs to know: frame and training sizes, class names, normalisation,
plus the training scores) and, in ``last.pt``, the trainer's resume state (opaque here). Reading
one with a missing or unknown fact is an error naming the key, never a silent default. An
ensemble bundle (``trainer export --out model.pt``) holds the config, the model metadata and
every fold's state dict. Both are plain dicts of tensors and builtins tagged with a format string,
so they load whatever this code's classes are called.

Layouts: ``fold-checkpoint/2`` nests ``facts`` and ``training``; ``fold-checkpoint/1`` (written
before) stored the same keys flat, and is still read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.decision import default_min_areas, default_thresholds
from engine.files import atomic_write
from engine.hashing import file_sha256
from engine.metadata import ModelMetadata
from network.build import build_unet
from network.config import UNetConfig

FOLD_FORMAT = "strip-inspection/fold-checkpoint/2"
FOLD_FORMAT_V1 = "strip-inspection/fold-checkpoint/1"
ENSEMBLE_FORMAT = "strip-inspection/ensemble/1"
FORMATS = (FOLD_FORMAT, FOLD_FORMAT_V1, ENSEMBLE_FORMAT)

# The resume state fold-checkpoint/1 stored next to the facts (moved under "training" in /2).
_V1_TRAINING_KEYS = frozenset({"optimizer", "scheduler", "scaler", "early_stopping", "rng", "seconds", "finished",
                               "best_epoch", "best_val_loss"})
_PAYLOAD_KEYS = frozenset({"format", "unet", "state_dict"})


@dataclass(frozen=True)
class FoldFacts:
    """What one fold was trained on and how it scored.

    Attributes:
        fold: the fold number (0-based).
        epoch: the epoch these weights are from.
        input_size: (height, width) of the camera frames it takes.
        train_size: (height, width) the U-Net ran at.
        class_names: one name per class.
        mean, std: input normalisation after scaling to 0..1.
        val_loss, val_dice, train_loss, train_dice: the epoch's scores (None when not trained by
            ``trainer fit``, e.g. a benchmark's random model).
        encoder_weights: the encoder's initialisation (``imagenet``, ``none``), or None.
        params_total, params_trainable: parameter counts, or None.
    """

    fold: int
    epoch: int
    input_size: tuple[int, int]
    train_size: tuple[int, int]
    class_names: tuple[str, ...]
    mean: float
    std: float
    val_loss: float | None = None
    val_dice: float | None = None
    train_loss: float | None = None
    train_dice: float | None = None
    encoder_weights: str | None = None
    params_total: int | None = None
    params_trainable: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", _size(self.input_size, "input_size"))
        object.__setattr__(self, "train_size", _size(self.train_size, "train_size"))
        object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"], d["train_size"] = list(self.input_size), list(self.train_size)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "checkpoint") -> FoldFacts:
        """Raises ValueError naming the missing or unknown keys."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: fold facts must be a mapping, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
        if missing or unknown:
            parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
                [f"has unknown {', '.join(unknown)}"] if unknown else [])
            raise ValueError(f"{source}: fold facts {' and '.join(parts)} (expected {', '.join(sorted(names))}); "
                             "was it written by another version? Retrain the fold or re-save it with this one")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: malformed fold facts ({exc})") from None


def _size(value: Any, name: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width), got {value!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return h, w


@dataclass
class FoldCheckpoint:
    """A fold checkpoint as read back: network config (a dict, see :class:`network.config.UNetConfig`),
    weights, facts, and the trainer's resume state (None in ``best.pt``)."""

    unet: dict[str, Any]
    state_dict: dict[str, Any]
    facts: FoldFacts
    training: dict[str, Any] | None = None

    def to_payload(self) -> dict[str, Any]:
        return {"format": FOLD_FORMAT, "unet": self.unet, "state_dict": self.state_dict,
                "facts": self.facts.to_dict(), "training": self.training}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str = "checkpoint") -> FoldCheckpoint:
        """Reads either layout; raises ValueError on a missing or unknown key."""
        fmt = payload.get("format")
        if fmt == FOLD_FORMAT:
            unknown = sorted(set(payload) - _PAYLOAD_KEYS - {"facts", "training"})
            missing = sorted((_PAYLOAD_KEYS | {"facts"}) - set(payload))
            if unknown or missing:
                raise ValueError(f"{source}: fold checkpoint has unknown keys {unknown} / lacks {missing}")
            return cls(payload["unet"], payload["state_dict"], FoldFacts.from_dict(payload["facts"], source),
                       payload.get("training"))
        if fmt == FOLD_FORMAT_V1:
            rest = {k: v for k, v in payload.items() if k not in _PAYLOAD_KEYS}
            training = {k: rest.pop(k) for k in sorted(_V1_TRAINING_KEYS & set(rest))}
            return cls(payload["unet"], payload["state_dict"], FoldFacts.from_dict(rest, source), training or None)
        raise ValueError(f"{source}: not a fold checkpoint (format {fmt!r}, expected {FOLD_FORMAT})")


# --------------------------------------------------------------------------- reading and writing


def save_fold_checkpoint(
    path: str | Path, cfg: UNetConfig, unet: nn.Module, facts: FoldFacts, training: dict[str, Any] | None = None
) -> None:
    """Writes a fold checkpoint (see the module docstring): the U-Net config, its state dict, the
    fold's facts, and the trainer's resume state (``last.pt`` only)."""
    if not isinstance(facts, FoldFacts):
        raise TypeError(f"facts must be a FoldFacts record, got {type(facts).__name__}")
    state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    payload = FoldCheckpoint(cfg.to_dict(), state, facts, training).to_payload()
    atomic_write(path, lambda tmp: torch.save(payload, tmp))  # an interrupted save leaves the old file


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a fold checkpoint or ensemble bundle, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") not in FORMATS:
        raise ValueError(f"{path}: not a strip-inspection checkpoint (expected format {FOLD_FORMAT} or {ENSEMBLE_FORMAT})")
    return payload


def read_fold_checkpoint(path: str | Path) -> FoldCheckpoint:
    """A fold checkpoint, typed; raises ValueError for an ensemble bundle or missing/unknown facts."""
    payload = load_checkpoint(path)
    if payload["format"] == ENSEMBLE_FORMAT:
        raise ValueError(f"{path}: is an ensemble bundle, not a fold checkpoint")
    return FoldCheckpoint.from_payload(payload, source=str(path))


def load_fold(path: str | Path) -> tuple[nn.Module, UNetConfig, FoldFacts]:
    """Rebuilds a fold's U-Net (eval mode, CPU) from its checkpoint; returns it, its config and facts."""
    checkpoint = read_fold_checkpoint(path)
    cfg = UNetConfig.from_dict(checkpoint.unet)
    unet = build_unet(cfg)
    unet.load_state_dict(checkpoint.state_dict)
    return unet.eval(), cfg, checkpoint.facts


def save_ensemble(path: str | Path, cfg: UNetConfig, folds: Sequence[nn.Module], meta: ModelMetadata) -> None:
    """Writes the ``.pt`` ensemble bundle the torch backend loads: config, metadata, every fold."""
    payload = {
        "format": ENSEMBLE_FORMAT,
        "unet": cfg.to_dict(),
        "metadata": meta.to_dict(),
        "folds": [{k: v.detach().cpu() for k, v in f.state_dict().items()} for f in folds],
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_ensemble(path: str | Path) -> tuple[list[nn.Module], UNetConfig, ModelMetadata]:
    """Loads a ``.pt`` ensemble bundle (or a single fold checkpoint as a one-fold ensemble)."""
    payload = load_checkpoint(path)
    cfg = UNetConfig.from_dict(payload["unet"])
    if payload["format"] == ENSEMBLE_FORMAT:
        meta = ModelMetadata.from_dict(payload["metadata"])
        states = payload["folds"]
    else:
        checkpoint = FoldCheckpoint.from_payload(payload, source=str(path))
        meta = fold_metadata(checkpoint.facts, cfg, checkpoint_sha256=[file_sha256(path)])
        states = [checkpoint.state_dict]
    folds = []
    for state in states:
        unet = build_unet(cfg)
        unet.load_state_dict(state)
        folds.append(unet.eval())
    return folds, cfg, meta


def fold_metadata(facts: FoldFacts, cfg: UNetConfig, **overrides: Any) -> ModelMetadata:
    """Metadata for a model made of folds trained like this one (thesis post-processing defaults
    unless ``overrides`` says otherwise)."""
    c = cfg.num_classes
    input_h, input_w = facts.input_size
    train_h, train_w = facts.train_size
    fields: dict[str, Any] = dict(
        num_classes=c,
        class_names=list(facts.class_names),
        input_height=int(input_h),
        input_width=int(input_w),
        train_height=int(train_h),
        train_width=int(train_w),
        thresholds=default_thresholds(c),
        min_areas=default_min_areas(c),
        folds=1,
        encoder=cfg.encoder,
        arch=cfg.arch,
        in_channels=cfg.in_channels,
        mean=float(facts.mean),
        std=float(facts.std),
    )
    fields.update(overrides)
    return ModelMetadata(**fields)
