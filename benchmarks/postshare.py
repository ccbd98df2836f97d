"""How much of a row's inference stage is post-processing, and the floor it is compared with.

The CPU backends run the inspection graph up to its low-resolution mean probabilities and then
decide (resize, threshold, count: :mod:`engine.fastpost`), or run the whole graph. ``bench
throughput`` times the network part alone (the backend's ``lowres``; for a row that runs the whole
graph, a twin of it loaded with ``postprocess="fast"``), once per row, on the same frames:
post-processing = inference stage - network part.

The floor counts the work the decision cannot avoid, per image: a separable bilinear resize from
the training resolution to the frame (``2*H*w + 2*H*W`` multiply-adds per class), one compare and
one add per output pixel, the masks written (``C*H*W`` bytes) and the low-resolution
probabilities read (``4*C*h*w`` bytes); its time is the larger of those FLOPs at the run's fp32
matmul peak and those bytes at the memory bandwidth measured in the same run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryBandwidth:
    """A measured copy bandwidth: bytes read plus bytes written per second."""

    bytes_per_s: float
    size_bytes: int
    repeats: int
    method: str = "numpy copy"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_memory_bandwidth(size_bytes: int = 256 << 20, repeats: int = 5) -> MemoryBandwidth:
    """Best of ``repeats`` copies of a ``size_bytes`` array (far beyond the caches): read + write bytes/s."""
    source = np.ones(size_bytes // 4, dtype=np.float32)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):  # the first touches the pages
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return MemoryBandwidth(2 * source.nbytes / best, source.nbytes, repeats)


@dataclass(frozen=True)
class PostFloor:
    """The decision's unavoidable work per image, and its time on this machine."""

    multiply_adds: int
    compares: int
    adds: int
    bytes_moved: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def post_floor(meta: Any, fp32_flops_per_s: float | None, bandwidth: MemoryBandwidth | None) -> PostFloor | None:
    """:class:`PostFloor` of one model (its metadata), or None without a peak or bandwidth to compare with."""
    if not fp32_flops_per_s or bandwidth is None:
        return None
    c, (height, width), (h, w) = meta.num_classes, meta.input_size, meta.train_size
    pixels = c * height * width
    multiply_adds = c * (2 * height * w + 2 * height * width)
    flops = 2 * multiply_adds + 2 * pixels
    moved = pixels + 4 * c * h * w
    seconds = max(flops / fp32_flops_per_s, moved / bandwidth.bytes_per_s)
    return PostFloor(multiply_adds, pixels, pixels, moved, seconds)


class NetworkPart:
    """Runs one row's network part alone: the backend itself where it takes the fast path, else a twin
    of it with ``postprocess="fast"`` (None where the model allows no fast path or the backend has none)."""

    def __init__(self, backend: Any, path: Path, device: str, options: dict[str, Any]) -> None:
        from engine.backends import load_backend
        from engine.devices import parse_device
        from engine.lowres import FastPathUnavailable

        self.owned = None
        self.runner = None
        if not hasattr(backend, "lowres") or not parse_device(device).is_cpu:
            return
        if getattr(backend, "fast", None) is not None:
            self.runner = backend
            return
        try:
            self.owned = self.runner = load_backend(path, device=device, **{**options, "postprocess": "fast"})
        except (FastPathUnavailable, RuntimeError, ValueError) as exc:
            log.info("%s: no network part to time alone (%s)", path.name, exc)

    def time(self, frames: np.ndarray, repeats: int) -> list[float] | None:
        """Seconds per call of the network part on ``frames`` (one untimed call first)."""
        if self.runner is None:
            return None
        self.runner.lowres(frames)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.runner.lowres(frames)
            seconds.append(time.perf_counter() - start)
        return seconds

    def close(self) -> None:
        if self.owned is not None:
            self.owned.close()
