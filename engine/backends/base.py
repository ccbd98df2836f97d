"""The one backend interface: uint8 camera frames in, a typed inspection result out.

Every backend hands its runtime's named outputs to :func:`result_from_outputs`, the one place the
graph's output names (:mod:`engine.graph`) become an :class:`InspectionResult`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.devices import BackendUnavailable
from engine.graph import COUNTS, MASKS, PRESENT, PROBS_NAME
from engine.metadata import ModelMetadata
from engine.rle import encode_batch

__all__ = ["Backend", "BackendUnavailable", "InspectionResult", "check_frames", "result_from_outputs"]


@dataclass
class InspectionResult:
    """What every backend returns for a batch of N frames with C classes.

    Attributes:
        masks: uint8 0/1 ``[N, C, H, W]`` at the frames' resolution (host memory).
        counts: int32 ``[N, C]`` exact defect pixel counts.
        present: bool ``[N, C]``: ``counts >= min_area`` per class.
        probs: float32 ``[N, C, H, W]`` mean probabilities, only when asked for (debugging).
        gate: float32 ``[N, C]`` mean class probabilities of the folds' gate heads, where a
            backend reports them (the trainer's run ensemble, for the gate's threshold search).
        encoded: RLE strings ``[image][class]`` already computed where the masks were produced
            (GPU backends find run boundaries on the device), or None to encode on the host.
    """

    masks: np.ndarray
    counts: np.ndarray
    present: np.ndarray
    probs: np.ndarray | None = None
    encoded: list[list[str]] | None = None
    gate: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    def rle(self) -> list[list[str]]:
        """Kaggle RLE strings, ``[image][class]``, vectorised over the whole batch."""
        if self.encoded is not None:
            return self.encoded
        return encode_batch(self.masks)

    def subset(self, index: Any) -> InspectionResult:
        encoded = None
        if self.encoded is not None:
            encoded = [self.encoded[i] for i in np.arange(len(self))[index].reshape(-1)]
        return InspectionResult(
            masks=self.masks[index],
            counts=self.counts[index],
            present=self.present[index],
            probs=None if self.probs is None else self.probs[index],
            encoded=encoded,
        )


def result_from_outputs(outputs: Mapping[str, Any], encoded: list[list[str]] | None = None) -> InspectionResult:
    """An inspection graph's outputs, by name (host numpy arrays), as an :class:`InspectionResult`.

    Counts come back int32 and ``present`` bool whatever integer or boolean type a runtime reports
    (OpenVINO widens them); the optional probabilities are None when the graph has none.
    """
    return InspectionResult(
        masks=outputs[MASKS.name],
        counts=np.asarray(outputs[COUNTS.name]).astype(np.int32, copy=False),
        present=np.asarray(outputs[PRESENT.name]).astype(bool, copy=False),
        probs=outputs.get(PROBS_NAME),
        encoded=encoded,
    )


def check_frames(frames: Any, meta: ModelMetadata) -> None:
    """Raises ValueError unless ``frames`` is uint8 ``[N, input_height, input_width]`` with N >= 1."""
    shape = tuple(frames.shape)
    dtype = str(frames.dtype).replace("torch.", "")
    expected = (meta.input_height, meta.input_width)
    if dtype != "uint8":
        raise ValueError(f"frames must be uint8, got {dtype}")
    if len(shape) != 3 or shape[1:] != expected or shape[0] < 1:
        raise ValueError(
            f"frames must have shape [N, {expected[0]}, {expected[1]}] with N >= 1 (grayscale camera "
            f"frames at the model's input size), got {list(shape)}"
        )


class Backend(abc.ABC):
    """A loaded inspection model on one runtime and device.

    Subclasses set ``name`` (e.g. ``onnxruntime``), ``device`` (``cpu``, ``cuda:0``),
    ``precision`` and ``metadata``, and implement :meth:`infer`.
    """

    name: str = "backend"
    device: str = "cpu"
    precision: str = "fp32"
    metadata: ModelMetadata
    #: Largest batch the backend accepts in one call (a TensorRT profile's max), or None.
    max_batch_size: int | None = None
    #: Why this backend runs the model (set by :func:`engine.backends.load_backend`).
    selection: str = ""

    @abc.abstractmethod
    def infer(self, frames: Any) -> InspectionResult:
        """Runs the inspection graph on uint8 frames ``[N, H, W]`` (numpy, or a device tensor)."""

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Runs dummy batches so first real requests do not pay for lazy initialisation (the RLE
        kernel's compilation included)."""
        h, w = self.metadata.input_size
        for n in batch_sizes:
            self.infer(np.zeros((n, h, w), dtype=np.uint8)).rle()

    def close(self) -> None:
        """Releases runtime resources (sessions, device memory)."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "precision": self.precision}

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
