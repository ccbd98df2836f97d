"""Backends by file suffix: ``.engine``/``.plan`` TensorRT, ``.onnx`` ONNX Runtime, ``.pt`` torch.

Each implementation imports its runtime (tensorrt, onnxruntime, torch) only when loaded, so a
machine without TensorRT, or a server with an ONNX model, never pays for the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from engine.backends.base import Backend, BackendUnavailable, InspectionResult, check_frames

# suffix -> (module, class)
SUFFIXES: dict[str, tuple[str, str]] = {
    ".engine": ("engine.backends.tensorrt", "TensorRTBackend"),
    ".plan": ("engine.backends.tensorrt", "TensorRTBackend"),
    ".onnx": ("engine.backends.onnxruntime", "OnnxRuntimeBackend"),
    ".xml": ("engine.backends.openvino", "OpenVinoBackend"),
    ".pt": ("engine.backends.torch", "TorchBackend"),
}


def backend_class(path: str | Path) -> type[Backend]:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"{path}: unknown model file type {suffix!r}; expected one of {', '.join(SUFFIXES)} "
            "(.engine/.plan TensorRT, .onnx ONNX Runtime or OpenVINO, .xml OpenVINO IR, .pt torch)"
        )
    module, cls = SUFFIXES[suffix]
    return getattr(importlib.import_module(module), cls)


def load_backend(path: str | Path, device: str = "auto", **options: Any) -> Backend:
    """Loads a model file with the backend its suffix names.

    Args:
        path: ``.engine``/``.plan``, ``.onnx`` or ``.pt`` file.
        device: ``auto`` (GPU when the backend can use one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        options: backend-specific settings (e.g. ``threads`` for ONNX Runtime on the CPU).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, or a corrupt/foreign file.
        BackendUnavailable: the runtime or device is missing here; the message says how to fix it.
    """
    path = Path(path)
    cls = backend_class(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    return cls(path, device=device, **options)


__all__ = ["Backend", "BackendUnavailable", "InspectionResult", "check_frames", "load_backend", "SUFFIXES"]
