"""The naive pipeline: how the thesis ran its models, kept as the baseline and as a reference.

One image at a time: torch eager fp32 for every fold, the network outputs copied to the host,
then numpy sigmoid, fold mean, per-class threshold and pixel count, and one
:func:`engine.rle.encode` call per (image, class). Every bench row reports its speed-up over
this; the tests check that its outputs equal the backends' (so it is a correctness reference too).

It reuses the project's definitions where they are definitions (``preprocess`` for the network
input, ``resize`` for the upscale back to the frame size, ``encode`` for RLE) and is naive only in
how it runs them: per image, per fold, per class, with a host round trip in the middle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.devices import is_cuda
from engine.metadata import ModelMetadata
from engine.rle import encode

#: Naive stage names, in pipeline order (the bench's stage columns use the same names).
NAIVE_STAGES = ("h2d", "inference", "d2h", "postprocess_rle")


@dataclass
class NaiveResult:
    """Outputs for N frames, shaped like :class:`engine.backends.InspectionResult`, plus RLE and probs."""

    masks: np.ndarray
    counts: np.ndarray
    present: np.ndarray
    probs: np.ndarray
    rles: list[list[str]]
    stage_seconds: dict[str, float] = field(default_factory=dict)


def numpy_sigmoid(logits: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflow for very negative logits is 1/inf = 0, correct
        return 1.0 / (1.0 + np.exp(-logits))


class NaivePipeline:
    """Per-image eager inference with host-side numpy post-processing.

    Args:
        folds: the fold U-Nets (logit outputs).
        meta: the model's metadata (sizes, normalisation, thresholds, minimum areas).
        device: torch device the U-Nets run on (``cpu`` or ``cuda[:N]``), always in fp32.
    """

    name = "naive"
    precision = "fp32"

    def __init__(self, folds: list[Any], meta: ModelMetadata, device: str = "cpu") -> None:
        from engine.devices import torch_device

        self.device = str(torch_device(device))
        self.folds = [fold.to(self.device).eval().float() for fold in folds]
        self.metadata = meta
        self.thresholds = np.asarray(meta.thresholds, dtype=np.float32)
        self.min_areas = np.asarray(meta.min_areas, dtype=np.int64)

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu") -> NaivePipeline:
        """Loads the folds from a ``.pt`` ensemble bundle or fold checkpoint."""
        from network.checkpoint import load_ensemble

        path = Path(path)
        if path.suffix.lower() != ".pt":
            raise ValueError(
                f"{path}: the naive pipeline runs torch eager and needs a .pt ensemble bundle or fold "
                "checkpoint (write one with 'trainer export --out model.pt')"
            )
        folds, _, meta = load_ensemble(path)
        return cls(folds, meta, device=device)

    def _sync(self) -> None:
        if is_cuda(self.device):
            import torch

            torch.cuda.synchronize(self.device)

    def run(self, frames: np.ndarray) -> NaiveResult:
        """Inspects uint8 frames ``[N, H, W]`` one at a time; times each stage (seconds, summed over N)."""
        import torch

        from engine.backends.base import check_frames
        from network.processing import preprocess, resize

        check_frames(frames, self.metadata)
        meta = self.metadata
        n, c = int(frames.shape[0]), meta.num_classes
        h, w = meta.input_size
        masks = np.zeros((n, c, h, w), dtype=np.uint8)
        counts = np.zeros((n, c), dtype=np.int32)
        present = np.zeros((n, c), dtype=bool)
        probs_out = np.zeros((n, c, h, w), dtype=np.float32)
        rles: list[list[str]] = []
        seconds = dict.fromkeys(NAIVE_STAGES, 0.0)
        with torch.inference_mode():
            for i in range(n):
                t0 = time.perf_counter()
                frame = torch.from_numpy(frames[i : i + 1]).to(self.device)
                self._sync()
                t1 = time.perf_counter()
                x = preprocess(frame, meta)
                logits = [fold(x) for fold in self.folds]
                self._sync()
                t2 = time.perf_counter()
                host_logits = [lg.cpu().numpy() for lg in logits]
                t3 = time.perf_counter()
                probs = sum(numpy_sigmoid(lg) for lg in host_logits) / len(host_logits)
                probs = resize(torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32)), meta.input_size)
                probs = probs.numpy()[0]
                probs_out[i] = probs
                image_rles = []
                for k in range(c):
                    mask = (probs[k] >= self.thresholds[k]).astype(np.uint8)
                    masks[i, k] = mask
                    counts[i, k] = int(mask.sum())
                    present[i, k] = counts[i, k] >= self.min_areas[k]
                    image_rles.append(encode(mask))
                rles.append(image_rles)
                t4 = time.perf_counter()
                seconds["h2d"] += t1 - t0
                seconds["inference"] += t2 - t1
                seconds["d2h"] += t3 - t2
                seconds["postprocess_rle"] += t4 - t3
        return NaiveResult(masks, counts, present, probs_out, rles, seconds)


@dataclass
class Agreement:
    """How a backend's outputs compare with the naive pipeline's on the same frames.

    Pixels whose naive probability lies within ``band`` of the class threshold are excluded:
    per-image and batched convolutions, and numpy and torch sigmoids, round differently in the
    last bits, which can flip those pixels and nothing else. Counts may differ by at most the
    number of excluded pixels of their (image, class), and ``present`` only where the naive count
    is that close to the minimum area.
    """

    band: float
    pixels: int
    band_pixels: int
    differing_pixels: int
    count_violations: int
    present_violations: int
    max_count_difference: int
    #: bf16/int8 rows: the fraction of pixels outside the band their parity tolerance lets differ
    #: (toolchain.parity ``max_mask_mismatch``); counts and labels then follow the masks. 0 = exact.
    allowed_fraction: float = 0.0

    @property
    def equal(self) -> bool:
        if self.allowed_fraction:
            return self.differing_pixels <= self.allowed_fraction * self.pixels
        return not (self.differing_pixels or self.count_violations or self.present_violations)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "equal": self.equal}


def agreement_band(precision: str, device: str) -> float:
    """How far from the threshold a pixel may flip between a backend and the naive pipeline.

    fp32 on the CPU: 1e-4 (last-bit rounding of per-image vs batched convolutions, numpy vs torch
    sigmoid). fp32 on CUDA: 5e-3, since torch and ONNX Runtime run fp32 convolutions in TF32 there
    (10-bit mantissa) and pick different algorithms per batch size. fp16: 5e-2, the max probability
    difference the FP16 export is itself allowed against the fp32 reference. bf16 (1e-2) and int8
    (5e-2): the bands their parity tolerances exclude.
    """
    if precision == "fp16":
        return 5e-2
    if precision in ("bf16", "int8"):
        # The band the bf16/int8 parity tolerance excludes (toolchain.parity.BF16_TOLERANCE / INT8_TOLERANCE).
        from toolchain.parity import tolerance_for

        return tolerance_for(precision).threshold_band
    return 5e-3 if is_cuda(device) else 1e-4


def agreement(naive: NaiveResult, result: Any, thresholds: Any, min_areas: Any, band: float,
              allowed_fraction: float = 0.0) -> Agreement:
    """Compares ``result`` (masks/counts/present of a backend) with ``naive`` on the same frames."""
    c = naive.masks.shape[1]
    t = np.asarray(thresholds, dtype=np.float32).reshape(1, c, 1, 1)
    near = np.abs(naive.probs - t) < band
    differing = (np.asarray(result.masks) != naive.masks) & ~near
    near_count = near.sum(axis=(2, 3))
    count_diff = np.abs(np.asarray(result.counts, dtype=np.int64) - naive.counts.astype(np.int64))
    min_area = np.asarray(min_areas, dtype=np.int64).reshape(1, c)
    present_ok = (np.asarray(result.present) == naive.present) | (np.abs(naive.counts - min_area) <= near_count)
    return Agreement(
        band=band,
        pixels=int(naive.masks.size),
        band_pixels=int(near.sum()),
        differing_pixels=int(differing.sum()),
        count_violations=int((count_diff > near_count).sum()),
        present_violations=int((~present_ok).sum()),
        max_count_difference=int(count_diff.max(initial=0)),
        allowed_fraction=allowed_fraction,
    )
