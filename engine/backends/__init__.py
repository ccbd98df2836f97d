"""Backends by file suffix: ``.engine``/``.plan`` TensorRT, ``.onnx`` ONNX Runtime or OpenVINO,
``.xml`` OpenVINO IR, ``.pt`` torch.

An ``.onnx`` file on the CPU runs on the fastest backend that is here and within tolerance (see
:func:`choose_backend`): OpenVINO with the U-Nets in bf16 where the CPU has native bf16 and
openvino is installed, else ONNX Runtime fp32. ``backend=`` forces one.

Each implementation is named by its dotted module path in :data:`BACKENDS` (the one table) and
imported only when loaded, with its runtime (tensorrt, onnxruntime, torch), so a machine without
TensorRT, or a server with an ONNX model, never pays for the others. The torch backend lives with
the network (:mod:`network.backend`): engine never imports torch code, it only names it here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from engine.backends.base import Backend, InspectionResult, check_frames, result_from_outputs
from engine.devices import BackendUnavailable, parse_device

#: backend name -> (module, class, suffixes it runs, how to install its runtime). For a suffix that
#: several backends run, the first listed is the one the suffix alone picks (see :func:`choose_backend`).
BACKENDS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "onnxruntime": ("engine.backends.onnxruntime", "OnnxRuntimeBackend", (".onnx",),
                    "pip install 'strip-inspection[cpu]' (or [gpu] for CUDA)"),
    "openvino": ("engine.backends.openvino", "OpenVinoBackend", (".onnx", ".xml"),
                 "pip install 'strip-inspection[cpu]'"),
    "tensorrt": ("engine.backends.tensorrt", "TensorRTBackend", (".engine", ".plan"),
                 "pip install 'strip-inspection[gpu]'"),
    "torch": ("network.backend", "TorchBackend", (".pt",), "pip install 'strip-inspection[train]'"),
}
BACKEND_CHOICES = ("auto", *BACKENDS)
#: suffix -> the backend that suffix alone picks (derived from :data:`BACKENDS`).
SUFFIXES: dict[str, str] = {s: name for name, entry in reversed(BACKENDS.items()) for s in entry[2]}


def _import_class(name: str) -> type[Backend]:
    """The backend class ``name``, imported now; BackendUnavailable when its runtime is not installed."""
    module, cls, _, install = BACKENDS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] in ("engine", "network"):
            raise  # our own code is broken: not a missing runtime
        raise BackendUnavailable(f"the {name} backend needs {exc.name or 'a runtime'}, which cannot be imported "
                                 f"here ({exc}): {install}") from exc


def backend_class(path: str | Path) -> type[Backend]:
    """The class that runs ``path`` by its suffix alone (raises ValueError for an unknown suffix)."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"{path}: unknown model file type {suffix!r}; expected one of {', '.join(SUFFIXES)} "
            "(.engine/.plan TensorRT, .onnx ONNX Runtime or OpenVINO, .xml OpenVINO IR, .pt torch)"
        )
    return _import_class(SUFFIXES[suffix])


def _openvino_here() -> str | None:
    """None when OpenVINO can run bf16 here, else why not."""
    import importlib.util

    from engine.cpu import no_bf16_reason, supports_bf16

    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed"
    if not supports_bf16():
        return no_bf16_reason()
    return None


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose_backend(
    path: str | Path, device: str = "auto", backend: str | None = None, precision: str | None = None
) -> tuple[str, str]:
    """Which backend runs ``path``, and why (one line for logs).

    ``auto`` for an ``.onnx`` file: ONNX Runtime on a GPU (device cuda, or auto with
    onnxruntime-gpu present); on the CPU OpenVINO (U-Nets in bf16, pre/post-processing fp32, within
    the tolerance of :data:`toolchain.parity.BF16_TOLERANCE`) where the CPU has native bf16 and openvino is
    installed, else ONNX Runtime fp32. ``precision="fp32"`` on the CPU picks ONNX Runtime, ``bf16``
    OpenVINO. Other suffixes have one backend.

    Raises:
        ValueError: an unknown backend, or one that cannot run this file type.
    """
    suffix = Path(path).suffix.lower()
    if backend not in (None, *BACKEND_CHOICES):
        raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    if backend not in (None, "auto"):
        if suffix not in BACKENDS[backend][2]:
            raise ValueError(f"{path}: the {backend} backend runs {'/'.join(BACKENDS[backend][2])} files, not {suffix}")
        return backend, f"{backend} (asked for)"
    if suffix != ".onnx":
        if suffix not in SUFFIXES:
            backend_class(path)  # raises, naming the known suffixes
        name = SUFFIXES[suffix]
        return name, f"{name} (the backend for {suffix} files)"
    kind = parse_device(device).kind
    if kind == "cuda" or (kind == "auto" and precision is None and _ort_has_cuda()):
        return "onnxruntime", "onnxruntime (GPU device)"
    if precision == "fp32":
        return "onnxruntime", "onnxruntime (fp32 asked for)"
    why_not = _openvino_here()
    if why_not is None:
        return "openvino", "openvino bf16 (auto: the fastest CPU backend within tolerance here)"
    if precision == "bf16":
        raise ValueError(f"precision bf16 asked for, but OpenVINO bf16 cannot run here: {why_not}")
    return "onnxruntime", f"onnxruntime fp32 (auto: {why_not})"


def load_backend(
    path: str | Path, device: str = "auto", backend: str | None = None, precision: str | None = None, **options: Any
) -> Backend:
    """Loads a model file with the backend :func:`choose_backend` picks (or ``backend``).

    Args:
        path: ``.engine``/``.plan``, ``.onnx``, ``.xml`` (OpenVINO IR) or ``.pt`` file.
        device: ``auto`` (GPU when the backend can use one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        backend: ``auto``/None, or force ``onnxruntime``, ``openvino``, ``tensorrt``, ``torch``.
        precision: ask for a precision (``fp32``, ``bf16``, ``int8``, ``fp16``) where the backend has a choice.
        options: backend-specific settings (e.g. ``threads`` for ONNX Runtime or OpenVINO on the CPU).

    The chosen backend's ``selection`` attribute says why it was chosen.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, or a corrupt/foreign file.
        BackendUnavailable: the runtime or device is missing here; the message says how to fix it.
    """
    path = Path(path)
    name, why = choose_backend(path, device, backend, precision)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    if precision is not None:
        if name == "onnxruntime" and precision != "fp32":
            raise ValueError(f"precision {precision}: ONNX Runtime runs the graph in its own precision (fp32 or an FP16 export)")
        if name in ("openvino", "torch"):
            options["precision"] = precision
    loaded = _import_class(name)(path, device=device, **options)
    loaded.selection = why
    return loaded


__all__ = [
    "BACKENDS", "BACKEND_CHOICES", "Backend", "BackendUnavailable", "InspectionResult", "SUFFIXES", "check_frames",
    "choose_backend", "load_backend", "result_from_outputs",
]
