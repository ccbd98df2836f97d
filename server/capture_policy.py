"""Which frames ``server serve --capture`` saves for retraining: the policy and its flag syntax.

A policy is a comma-separated list of rules: ``uncertain`` (a class whose pixel count lies near its
minimum area), ``defects`` (any present class), ``sample:P`` (a random share P of the frames),
``disagree`` (a shadow-run candidate disagrees with production on a class's presence: the frame is
saved with the candidate's predictions, :mod:`server.shadow`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

POLICY_TOKENS = ("uncertain", "defects", "sample:P", "disagree")
DEFAULT_CAPTURE_POLICY = "uncertain,defects,sample:0.01"
#: A class is "uncertain" when its pixel count lies in [lo, hi] x its minimum area (and is not 0).
DEFAULT_UNCERTAIN_BAND = (0.5, 2.0)


@dataclass(frozen=True)
class CapturePolicy:
    """Which frames to capture.

    Attributes:
        uncertain: frames with a class whose pixel count is near its minimum area, within
            ``uncertain_band`` (``[lo, hi] x min_area``, count > 0): the decisions most likely wrong.
            Defined on the exact counts the server has; probabilities are not output in production.
        defects: frames with any present class.
        sample: share of all frames captured at random (0 = none).
        disagree: frames where the shadow-run candidate disagrees with production (chosen by the
            shadow run, never by :meth:`reasons`).
        uncertain_band: the ``(lo, hi)`` multipliers of the minimum area.
    """

    uncertain: bool = False
    defects: bool = False
    sample: float = 0.0
    uncertain_band: tuple[float, float] = DEFAULT_UNCERTAIN_BAND
    disagree: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.uncertain_band
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= 1 <= hi):
            raise ValueError(
                f"uncertain band must be LO,HI with 0 <= LO <= 1 <= HI (multiples of the minimum area), got {lo},{hi}"
            )
        if not 0.0 <= self.sample <= 1.0:
            raise ValueError(f"capture sample share must be in 0..1, got {self.sample}")

    @classmethod
    def parse(cls, text: str, uncertain_band: tuple[float, float] = DEFAULT_UNCERTAIN_BAND) -> CapturePolicy:
        """Parses ``"uncertain,defects,sample:0.01"`` (any non-empty subset, any order).

        Raises:
            ValueError: empty policy, unknown or repeated token, or a bad sample share; the message
                names the token.
        """
        tokens = [t.strip() for t in str(text).split(",")]
        if not any(tokens):
            raise ValueError(f"capture policy is empty; expected a comma-separated list of {', '.join(POLICY_TOKENS)}")
        fields: dict[str, Any] = {}
        for token in tokens:
            name, sep, value = token.partition(":")
            name = name.strip().lower()
            if name in fields:
                raise ValueError(f"capture policy {text!r}: token {token!r} repeats {name!r}")
            if name in ("uncertain", "defects", "disagree") and not sep:
                fields[name] = True
            elif name == "sample" and sep:
                try:
                    share = float(value)
                except ValueError:
                    share = math.nan
                if not 0.0 < share <= 1.0:
                    raise ValueError(
                        f"capture policy {text!r}: token {token!r} needs a share in (0, 1], e.g. sample:0.01"
                    )
                fields[name] = share
            else:
                raise ValueError(
                    f"capture policy {text!r}: unknown token {token!r}; expected {', '.join(POLICY_TOKENS)} "
                    "(P a share in (0, 1])"
                )
        return cls(uncertain_band=tuple(uncertain_band), **fields)

    def __str__(self) -> str:
        parts = [n for n in ("uncertain", "defects") if getattr(self, n)]
        if self.sample:
            parts.append(f"sample:{self.sample:g}")
        if self.disagree:
            parts.append("disagree")
        return ",".join(parts) or "none"

    def reasons(
        self, counts: np.ndarray, present: np.ndarray, min_areas: Sequence[int], rng: np.random.Generator
    ) -> list[str]:
        """Why each of N frames is captured (``""`` = not captured), vectorised over the batch.

        A reason lists every rule that chose the frame, joined by ``+``: ``uncertain:<class ids>``,
        ``defects``, ``sample``; e.g. ``uncertain:3+defects``.

        Args:
            counts: int ``[N, C]`` exact predicted pixels per class.
            present: bool ``[N, C]`` the model's labels.
            min_areas: ``[C]`` per-class minimum areas from the model metadata.
            rng: draws the random sample (one draw per frame, whatever the policy).
        """
        counts = np.asarray(counts)
        present = np.asarray(present, dtype=bool)
        n = counts.shape[0]
        areas = np.asarray(min_areas, dtype=np.float64)
        if counts.ndim != 2 or present.shape != counts.shape or counts.shape[1] != areas.size:
            raise ValueError(
                f"counts and present must both be [N, {areas.size}] (one column per class), got "
                f"{list(counts.shape)} and {list(present.shape)}"
            )
        draws = rng.random(n)
        lo, hi = self.uncertain_band
        near = (counts > 0) & (counts >= lo * areas) & (counts <= hi * areas) if self.uncertain else None
        defective = present.any(axis=1) if self.defects else np.zeros(n, dtype=bool)
        sampled = draws < self.sample
        chosen = defective | sampled | (near.any(axis=1) if near is not None else False)
        out = [""] * n
        for i in np.flatnonzero(chosen):
            parts = []
            if near is not None and near[i].any():
                parts.append("uncertain:" + ",".join(str(k + 1) for k in np.flatnonzero(near[i])))
            if defective[i]:
                parts.append("defects")
            if sampled[i]:
                parts.append("sample")
            out[i] = "+".join(parts)
        return out
