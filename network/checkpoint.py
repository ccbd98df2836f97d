"""Fold checkpoints' typed facts: what a fold was trained on, read back strictly.

A fold checkpoint (``RUN/fold<k>/best.pt``, ``last.pt``) holds the U-Net config, its state dict,
a :class:`FoldFacts` record (what a model made of this fold needs to know: frame and training
sizes, class names, normalisation, plus the training scores) and, in ``last.pt``, the trainer's
resume state (opaque here: ``trainer.run.TrainingState`` owns it). Reading one with a missing or
unknown fact is an error naming the key, never a silent default. torch-free.

Layouts: ``fold-checkpoint/2`` nests ``facts`` and ``training``; ``fold-checkpoint/1`` (written
before) stored the same keys flat, and is still read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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
    """A fold checkpoint as read back: U-Net config (a dict, see ``engine.model.UNetConfig``),
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
