"""Torch backend: the eager reference. The fold U-Nets of a ``.pt`` ensemble bundle (or one fold
checkpoint) run in :class:`network.inspection.InspectionModel`, the module the ONNX graph is traced
from. ``engine.backends`` loads it by name for ``.pt`` files (engine itself never imports torch).

On CUDA it runs in fp16 with channels_last weights (what tensor cores want); on a CPU with native
bf16 (:func:`engine.cpu.supports_bf16`) the U-Nets run under bf16 autocast with channels_last, and
pre/post-processing in fp32; elsewhere in fp32. ``precision="fp32"`` gives the fp32 eager reference
every exported model is compared with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import graph
from engine.backends.base import Backend, InspectionResult, check_frames, result_from_outputs
from engine.cpu import no_bf16_reason, supports_bf16
from engine.devices import BackendUnavailable, parse_device, resolve_torch_device
from engine.rle import encode_batch_torch
from network.checkpoint import load_ensemble
from network.inspection import InspectionModel

log = logging.getLogger(__name__)


class TorchBackend(Backend):
    """Runs a ``.pt`` ensemble bundle (``trainer export --out model.pt``) or a fold checkpoint eagerly.

    Args:
        path: ``.pt`` bundle or fold checkpoint.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``fp16`` (CUDA) or ``bf16`` (autocast; CPU with native bf16, or CUDA);
            default fp16 on CUDA, bf16 on a CPU with native bf16, else fp32.
        threads: torch CPU threads (process-wide; 0 leaves torch's setting alone).
        with_probs: also return the mean probabilities (debugging, parity tests).
    """

    name = "torch"

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        precision: str | None = None,
        threads: int = 0,
        with_probs: bool = False,
    ) -> None:
        self.path = Path(path)
        self.device = resolve_torch_device(device, torch.cuda.is_available(), torch.cuda.device_count())
        self._on_cuda = on_cuda = parse_device(self.device).is_cuda
        self.precision = precision or ("fp16" if on_cuda else "bf16" if supports_bf16() else "fp32")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.precision == "fp16" and not on_cuda:
            raise ValueError("precision fp16 needs CUDA: half-precision convolutions on the CPU are slow and not the reference")
        if self.precision == "bf16" and not on_cuda and not supports_bf16():
            raise BackendUnavailable(f"precision bf16 asked for, but {no_bf16_reason()}; use precision fp32")
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        if threads:
            torch.set_num_threads(threads)
        folds, _, self.metadata = load_ensemble(self.path)
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        autocast = torch.bfloat16 if self.precision == "bf16" else None
        model = InspectionModel(folds, self.metadata, with_probs=with_probs, compute_dtype=dtype, autocast=autocast).eval()
        model.folds.to(device=self.device, dtype=dtype)
        if on_cuda or autocast is not None:
            model.folds.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        self.with_probs = with_probs
        log.info("loaded %s on %s (%s, %d folds)", self.path, self.device, self.precision, len(folds))

    def infer(self, frames: Any) -> InspectionResult:
        check_frames(frames, self.metadata)
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
            if self._on_cuda:
                frames = frames.pin_memory().to(self.device, non_blocking=True)
        else:
            frames = frames.to(self.device)
        with torch.inference_mode():
            outputs = self.model(frames)
        encoded = encode_batch_torch(outputs[0]) if self._on_cuda else None
        # InspectionModel returns the graph's outputs in the graph's order.
        names = (*graph.OUTPUT_NAMES, graph.PROBS_NAME)
        return result_from_outputs({n: t.float().cpu().numpy() if n == graph.PROBS_NAME else t.cpu().numpy()
                                    for n, t in zip(names, outputs)}, encoded=encoded)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "folds": self.metadata.folds}

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
