"""Exact post-processing on the CPU: the inspection graph's resize, threshold, count and presence,
from the low-resolution mean probabilities, in one pass.

The graph computes ``probs`` at the camera's resolution in float32 (4 classes x 256 x 1600 for a
Severstal frame), then compares, counts and casts them: several passes over full-resolution floats.
:class:`FastPostprocess` makes the same masks without materialising them: per output pixel the
graph's bilinear value (ONNX Runtime's half-pixel coordinates and formula, so its float32 value
is the graph's, bit for bit), one compare, one add, one byte written; rows whose source rows lie
wholly below the threshold are cleared without arithmetic. The decision's parameters come from
the model metadata, which :func:`engine.lowres.find_post_cut` has checked against the graph's own
constants. Counts are the masks' sums, ``present = counts >= min_areas`` (and the gate's mean
probability >= its threshold where the model has a gate).

A batch's planes (image x class) are shared between the calling thread and helper threads, one
fewer than the usable CPUs: the kernel releases the GIL, and the U-Net's threads are idle while it
runs (the `make demo` model's int8 batch of 8: 6.7 -> 4.0 ms on 2 cores, the same bytes).

The kernel is compiled with numba (the ``cpu`` extra); without numba this module raises
:class:`engine.lowres.FastPathUnavailable` and the backends run the whole graph.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from engine import graph
from engine.backends.base import InspectionResult, result_from_outputs
from engine.cpu import usable_cpus
from engine.devices import BackendUnavailable
from engine.kernels import import_kernel
from engine.lowres import GATE_KEY, LOWRES_KEY, FastPathUnavailable
from engine.metadata import ModelMetadata

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Output rows are skipped (all zeros) only where every source value lies below ``threshold - MARGIN``:
#: far above float32 rounding of the bilinear sum of values in [0, 1] (a few 1e-8).
MARGIN = 1e-5
INSTALL_HINT = "pip install 'strip-inspection[cpu]' (or pip install numba)"


def kernel() -> Any:
    """The compiled kernel module; FastPathUnavailable where numba is not installed."""
    module, why_not = import_kernel("engine.fastpost_kernel")
    if module is None:
        raise FastPathUnavailable(f"{why_not}: {INSTALL_HINT}")
    return module


@functools.lru_cache(maxsize=16)
def resize_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One axis of ONNX Runtime's half-pixel linear resize from ``n_in`` to ``n_out`` samples.

    Returns (first source index, second source index, weight of the first, weight of the second)
    per output sample, computed as ONNX Runtime computes them in float32: source coordinate
    ``(x + 0.5) / (n_out / n_in) - 0.5`` clamped to ``[0, n_in - 1]``; at a clamped edge both
    indices are the same and the weights 0.5 each.
    """
    scale = np.float32(n_out) / np.float32(n_in)
    x = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) / scale - np.float32(0.5)
    x = np.clip(x, np.float32(0.0), np.float32(n_in - 1))
    first = np.minimum(x.astype(np.int64), n_in - 1)
    second = np.minimum(first + 1, n_in - 1)
    w_second = np.abs(x - first.astype(np.float32)).astype(np.float32)
    w_first = np.abs(x - second.astype(np.float32)).astype(np.float32)
    edge = first == second
    w_first[edge], w_second[edge] = 0.5, 0.5
    tables = (first.astype(np.int32), second.astype(np.int32), w_first, w_second)
    for table in tables:
        table.flags.writeable = False  # shared by every call (cached)
    return tables


@functools.cache
def _helpers() -> tuple[ThreadPoolExecutor | None, int]:
    """Threads that decide planes beside the caller's (the kernel releases the GIL), and how many: one fewer
    than the usable CPUs, shared by every model; none on one CPU."""
    extra = usable_cpus() - 1
    return (ThreadPoolExecutor(extra, thread_name_prefix="fastpost") if extra > 0 else None), max(extra, 0)


class FastPostprocess:
    """The graph's decision from low-resolution probabilities, for one model.

    Args:
        meta: the model's metadata (thresholds, minimum areas, gate thresholds, frame size).
    """

    def __init__(self, meta: ModelMetadata) -> None:
        self.kernel = kernel()
        self.thresholds = np.asarray(meta.thresholds, dtype=np.float32)
        self.min_areas = np.asarray(meta.min_areas, dtype=np.int32)
        self.gate_thresholds = (None if meta.gate_thresholds is None
                                else np.asarray(meta.gate_thresholds, dtype=np.float32))
        self.frame_size = meta.input_size

    def warmup(self, low_size: tuple[int, int]) -> None:
        """Compiles (or loads the cached) kernel now rather than on the first real batch."""
        self(np.zeros((1, len(self.thresholds), *low_size), dtype=np.float32),
             None if self.gate_thresholds is None else np.zeros((1, len(self.thresholds)), np.float32))

    def __call__(self, probs: np.ndarray, gate: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Low-resolution mean probabilities float32 ``[N, C, h, w]`` (and the gate's ``[N, C]``) ->
        the graph's outputs by name: masks uint8 ``[N, C, H, W]``, counts int32, present bool."""
        probs = np.ascontiguousarray(probs, dtype=np.float32)
        n, c, h, w = probs.shape
        if c != len(self.thresholds):
            raise ValueError(f"probabilities have {c} classes, the model {len(self.thresholds)}")
        height, width = self.frame_size
        masks = np.empty((n, c, height, width), dtype=np.uint8)
        counts = np.empty((n, c), dtype=np.int32)
        self._decide(probs, (*resize_axis(h, height), *resize_axis(w, width)), masks, counts)
        present = counts >= self.min_areas[None, :]
        if self.gate_thresholds is not None:
            if gate is None:
                raise ValueError("the model has a gate, but no gate probabilities were given")
            present &= np.asarray(gate, dtype=np.float32) >= self.gate_thresholds[None, :]
        return {graph.MASKS.name: masks, graph.COUNTS.name: counts, graph.PRESENT.name: present}

    def _decide(self, probs: np.ndarray, axes: tuple[np.ndarray, ...], masks: np.ndarray, counts: np.ndarray) -> None:
        """The kernel over the batch's planes, split between the caller and the helper threads: the U-Net's
        threads are idle while it runs, and each plane is written by one thread only."""
        planes = probs.shape[0] * probs.shape[1]
        helpers, extra = _helpers()
        parts = max(1, min(planes, extra + 1))  # an empty batch: one empty part
        bounds = [planes * i // parts for i in range(parts + 1)]
        args = (probs, self.thresholds, np.float32(MARGIN), *axes, masks, counts)
        futures = [helpers.submit(self.kernel.decide, *args, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])] \
            if helpers is not None else []
        self.kernel.decide(*args, bounds[0], bounds[1])
        for future in futures:
            future.result()

    def result(self, tensors: Mapping[str, np.ndarray]) -> InspectionResult:
        """A backend's answer from its graph's low-resolution tensors (by :mod:`engine.lowres` key):
        the decision made here, the gate's probabilities kept on the result."""
        gate = tensors.get(GATE_KEY)
        result = result_from_outputs(self(tensors[LOWRES_KEY], gate))
        result.gate = gate
        return result


# --------------------------------------------------------------------------- the backends' choice

#: ``postprocess=`` of the CPU backends: ``auto`` the fast path where the graph allows it (else the
#: whole graph, logging why), ``fast`` the fast path or an error saying why not, ``graph`` the whole graph.
POSTPROCESS_CHOICES = ("auto", "fast", "graph")


def check_choice(postprocess: str) -> None:
    if postprocess not in POSTPROCESS_CHOICES:
        raise ValueError(f"postprocess must be one of {', '.join(POSTPROCESS_CHOICES)}, got {postprocess!r}")


def fast_or_graph(postprocess: str, source: str, build: Callable[[], T]) -> tuple[T | None, str]:
    """Builds the fast path with ``build`` unless ``postprocess`` is ``graph``.

    Returns:
        (what ``build`` returned, or None to run the whole graph; why, one line for logs and ``describe``).

    Raises:
        BackendUnavailable: ``postprocess="fast"`` and ``build`` raised FastPathUnavailable.
    """
    check_choice(postprocess)
    if postprocess == "graph":
        return None, "graph (asked for)"
    try:
        return build(), "fast (resize, threshold and count from the low-resolution probabilities)"
    except FastPathUnavailable as exc:
        if postprocess == "fast":
            raise BackendUnavailable(f"{source}: the fast post-processing cannot run this model: {exc}") from exc
        log.info("%s: post-processing in the graph: %s", source, exc)
        return None, f"graph ({exc})"
