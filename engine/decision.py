"""The decision defaults: the thesis' rule, used wherever no searched post-processing exists yet.

A pixel is a defect when its probability reaches the threshold; a class is present when its
pixels reach the minimum area. ``trainer evaluate --split oof`` searches per-class values; a model
carries its own in its metadata. These are only the starting point. The empty-frame gate (the folds'
class heads, ``trainer fit --gate``) has its own default threshold on the mean class probability.
:class:`PostProcess` is the typed record of a searched rule (a run's ``postprocess.json``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Probability at or above which a pixel is a defect.
DEFAULT_THRESHOLD = 0.5
#: Defect pixels (at the camera's resolution) at or above which a class is present.
DEFAULT_MIN_AREA = 200
#: Mean gate-head class probability at or above which the gate lets a class be present.
DEFAULT_GATE_THRESHOLD = 0.5


def default_thresholds(num_classes: int) -> list[float]:
    return [DEFAULT_THRESHOLD] * num_classes


def default_min_areas(num_classes: int) -> list[int]:
    return [DEFAULT_MIN_AREA] * num_classes


def default_gate_thresholds(num_classes: int) -> list[float]:
    return [DEFAULT_GATE_THRESHOLD] * num_classes


# --------------------------------------------------------------------------- the searched rule of a run

#: ``PostProcess`` fields a ``postprocess.json`` must hold; every other field may be absent (files
#: written before it existed, or by tools that record only the rule).
_REQUIRED = ("thresholds", "min_areas")


@dataclass(frozen=True)
class PostProcess:
    """A run's searched decision rule: the typed record ``RUN/postprocess.json`` holds.

    ``trainer evaluate --split oof`` writes it, ``trainer export`` puts its rule into the model's
    metadata, ``trainer report`` shows it; the run directory (``trainer.rundir``) says where it is.
    Reading one with a missing rule or an unknown key is an error naming both.

    Attributes:
        thresholds, min_areas: the per-class rule.
        tta: the flip TTA the rule was searched with (``none`` for files from before TTA).
        gate_thresholds: per-class gate thresholds, searched for folds with a gate head.
        The rest records how the search went (objective, grids, scores before and after, the
        scored folds and their checkpoints' hashes, who wrote it); None where not recorded.
    """

    thresholds: list[float]
    min_areas: list[int]
    tta: str = "none"
    gate_thresholds: list[float] | None = None
    objective: str | None = None
    images: int | None = None
    kaggle_before: float | None = None
    kaggle_after: float | None = None
    kaggle_after_gate: float | None = None
    kaggle_per_class_before: list[float] | None = None
    kaggle_per_class_after: list[float] | None = None
    baseline: dict[str, Any] | None = None
    threshold_grid: list[float] | None = None
    min_area_grid: list[int] | None = None
    split: str | None = None
    folds: int | None = None
    scored_folds: list[int] | None = None
    run: str | None = None
    checkpoint_sha256: list[str | None] | None = None
    written_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object (fields never recorded are left out)."""
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v is not None or k == "gate_thresholds"}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> PostProcess:
        """Parses and checks a ``postprocess.json`` text.

        Raises:
            ValueError: not JSON, not an object, a missing rule, an unknown key, or mistyped values;
                the message starts with ``source``.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object with 'thresholds' and 'min_areas'")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = [k for k in _REQUIRED if k not in data]
        if unknown or missing:
            raise ValueError(f"{source}: " + "; ".join(
                ([f"missing key(s) {', '.join(map(repr, missing))}"] if missing else [])
                + ([f"unknown key(s) {', '.join(map(repr, unknown))}"] if unknown else [])))
        try:
            rule = {"thresholds": [float(t) for t in _as_list(data, "thresholds", source)],
                    "min_areas": [int(a) for a in _as_list(data, "min_areas", source)]}
            if data.get("gate_thresholds") is not None:
                rule["gate_thresholds"] = [float(g) for g in _as_list(data, "gate_thresholds", source)]
        except (TypeError, ValueError) as exc:
            if str(exc).startswith(source):
                raise
            raise ValueError(f"{source}: thresholds must be numbers and min_areas integers ({exc})") from None
        if not isinstance(data.get("tta", "none"), str):
            raise ValueError(f"{source}: 'tta' must be a string, got {data['tta']!r}")
        return cls(**(data | rule))

    def check(self, num_classes: int, tta_modes: Sequence[str], source: str) -> PostProcess:
        """Returns self when its rule has one value per class and its TTA is one of ``tta_modes``
        (:data:`engine.metadata.TTA_MODES`, which imports this module); raises ValueError naming ``source``."""
        for name in ("thresholds", "min_areas", "gate_thresholds"):
            values = getattr(self, name)
            if values is not None and len(values) != num_classes:
                raise ValueError(f"{source}: '{name}' must be a list of {num_classes} values (one per class), "
                                 f"got {values!r}")
        if self.tta not in tta_modes:
            raise ValueError(f"{source}: 'tta' must be one of {', '.join(tta_modes)}, got {self.tta!r}")
        return self


def _as_list(data: dict[str, Any], name: str, source: str) -> list[Any]:
    values = data[name]
    if not isinstance(values, list):
        raise ValueError(f"{source}: '{name}' must be a list of values (one per class), got {values!r}")
    return values
