"""What ``trainer evaluate`` scores, each as a backend that returns :class:`engine.InspectionResult`.

- :class:`RunEnsembleBackend`: a run's fold U-Nets in :class:`network.inspection.InspectionModel` (the
  eager twin of the exported graph), probabilities included, for the holdout and out-of-fold splits;
- any engine backend (``--model FILE``: the exported artifact itself);
- :class:`PredictionsFile`: a Kaggle-format predictions CSV (e.g. streamed through the server).

:class:`Predictor` puts the three behind one call, ``predict(frames, image_ids)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.backends.base import Backend, InspectionResult, check_frames
from engine.cpu import cpu_autocast_dtype
from engine.devices import parse_device
from engine.metadata import ModelMetadata
from engine.rle import decode_many
from network.inspection import InspectionModel
from trainer.rundir import load_run


class RunEnsembleBackend(Backend):
    """A run's selected folds as one inspection model on a torch device, returning probabilities too.

    Args:
        run_dir: the training run.
        folds: ``"all"`` or fold numbers (one fold = that fold's out-of-fold model).
        device: a ``torch.device``.
        override: metadata fields to replace (e.g. the baseline thresholds for out-of-fold scoring).
    """

    name = "torch (run folds)"

    def __init__(self, run_dir: Path, folds: Sequence[int] | str, device: Any,
                 override: dict[str, Any] | None = None, amp: bool | None = False) -> None:


        loaded = load_run(run_dir, folds)
        self.metadata = dataclasses.replace(loaded.metadata, **(override or {}))
        self.fold_ids = loaded.fold_ids
        self.device = str(device)
        self._torch_device = device
        self._torch = torch
        # The U-Nets under bf16 autocast on a CPU with native bf16 when the run trained with --amp;
        # probabilities, losses and metrics stay fp32.
        autocast = cpu_autocast_dtype(bool(amp)) if parse_device(self.device).is_cpu else None
        self.precision = "bf16" if autocast is not None else "fp32"
        self.model = InspectionModel(loaded.folds, self.metadata, with_probs=True, autocast=autocast).eval().to(device)
        which = f"fold {loaded.fold_ids[0]}" if len(loaded.fold_ids) == 1 else f"ensemble of folds {loaded.fold_ids}"
        self.description = f"{which} of {run_dir}"

    def infer(self, frames: Any) -> InspectionResult:
        check_frames(frames, self.metadata)
        torch = self._torch
        with torch.inference_mode():
            probs, gate = self.model.outputs(torch.from_numpy(np.ascontiguousarray(frames))
                                             .to(self._torch_device, non_blocking=True))
            masks, counts, present = self.model.decide(probs, gate)
        return InspectionResult(masks=masks.cpu().numpy(), counts=counts.cpu().numpy(),
                                present=present.cpu().numpy(), probs=probs.cpu().numpy(),
                                gate=None if gate is None else gate.cpu().numpy())

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


@dataclass
class PredictionsFile:
    """Answers read from a Kaggle-format CSV: image id -> one RLE per class (empty = absent)."""

    path: Path
    rles: dict[str, list[str]]

    def infer(self, frames: np.ndarray, image_ids: Sequence[str]) -> InspectionResult:
        h, w = frames.shape[-2:]
        masks = np.stack([decode_many(self.rles[i], h, w) for i in image_ids])
        counts = masks.astype(np.int64).sum(axis=(2, 3)).astype(np.int32)
        # A predictions CSV carries a mask only for the classes it calls present.
        return InspectionResult(masks=masks, counts=counts, present=counts > 0)


@dataclass
class Predictor:
    """One way of predicting a group of images, with the name the evaluation reports."""

    name: str
    metadata: ModelMetadata | None  # None for a predictions CSV
    backend: Backend | None = None
    predictions: PredictionsFile | None = None

    def predict(self, frames: np.ndarray, image_ids: Sequence[str]) -> InspectionResult:
        """uint8 frames ``[N, H, W]`` (host) -> the result (probabilities only from a run ensemble)."""
        if self.predictions is not None:
            return self.predictions.infer(frames, image_ids)
        assert self.backend is not None
        return self.backend.infer(frames)

    @classmethod
    def of_run(cls, run_dir: Path, folds: Sequence[int] | str, device: Any,
               override: dict[str, Any] | None = None, amp: bool | None = False) -> Predictor:
        backend = RunEnsembleBackend(run_dir, folds, device, override, amp)
        return cls(name=backend.description, metadata=backend.metadata, backend=backend)

    @classmethod
    def of_backend(cls, path: str | Path, backend: Backend) -> Predictor:
        return cls(name=f"{path} ({backend.name} {backend.precision}, {backend.device})", metadata=backend.metadata,
                   backend=backend)

    @classmethod
    def of_predictions(cls, predictions: PredictionsFile) -> Predictor:
        return cls(name=f"predictions {predictions.path}", metadata=None, predictions=predictions)
