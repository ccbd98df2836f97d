"""Backends by file suffix: ``.engine``/``.plan`` TensorRT, ``.onnx`` ONNX Runtime or OpenVINO,
``.xml`` OpenVINO IR, ``.pt`` torch.

An ``.onnx`` file on the CPU runs on the fastest backend that is here and within tolerance (see
:func:`select_backend`): the int8 OpenVINO IR beside it where one passed its parity and the CPU has
native int8 (:mod:`engine.backends.int8`), else OpenVINO with the U-Nets in bf16 where the CPU has
native bf16 and openvino is installed, else ONNX Runtime fp32. ``backend=`` forces one.

Each implementation is named by its dotted module path in :data:`BACKENDS` (the one table) and
imported only when loaded, with its runtime (tensorrt, onnxruntime, torch), so a machine without
TensorRT, or a server with an ONNX model, never pays for the others. The torch backend lives with
the network (:mod:`network.backend`): engine never imports torch code, it only names it here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.backends.base import Backend, InspectionResult, check_frames, result_from_outputs
from engine.devices import BackendUnavailable, is_cuda, parse_device

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


@dataclass(frozen=True)
class BackendChoice:
    """What :func:`select_backend` decided: the backend, the file it runs (the model, or the int8 IR
    beside it) and why (one line for logs)."""

    backend: str
    path: Path
    reason: str


def select_backend(
    path: str | Path, device: str = "auto", backend: str | None = None, precision: str | None = None,
    int8: str | Path = "auto",
) -> BackendChoice:
    """Which backend runs ``path``, on which file, and why.

    ``auto`` for an ``.onnx`` file: ONNX Runtime on a GPU (device cuda, or auto with
    onnxruntime-gpu present); on the CPU the int8 IR beside it where :func:`engine.backends.int8.pick_int8`
    allows (``int8``: ``auto``, ``off`` or an IR's path), else OpenVINO (U-Nets in bf16,
    pre/post-processing fp32, within the tolerance of :data:`toolchain.parity.BF16_TOLERANCE`) where
    the CPU has native bf16 and openvino is installed, else ONNX Runtime fp32. ``precision="fp32"``
    on the CPU picks ONNX Runtime, ``bf16`` OpenVINO, ``int8`` the int8 IR. Other suffixes have one backend.

    Raises:
        ValueError: an unknown backend, one that cannot run this file type, or an int8 IR asked for
            that cannot run in place of the graph (saying why).
    """
    from engine.backends.int8 import INT8_MODES, pick_int8

    path, suffix = Path(path), Path(path).suffix.lower()
    explicit_int8 = str(int8) not in INT8_MODES
    if backend not in (None, *BACKEND_CHOICES):
        raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    if explicit_int8 and (suffix != ".onnx" or backend not in (None, "auto", "openvino")
                          or precision not in (None, "int8") or is_cuda(device)):
        raise ValueError(f"int8 IR {int8}: runs in place of an .onnx graph with OpenVINO on the CPU, not with "
                         f"{path.name} (backend {backend or 'auto'}, precision {precision or 'auto'}, device {device})")
    if backend not in (None, "auto"):
        if suffix not in BACKENDS[backend][2]:
            raise ValueError(f"{path}: the {backend} backend runs {'/'.join(BACKENDS[backend][2])} files, not {suffix}")
        if backend == "openvino" and suffix == ".onnx" and (precision == "int8" or explicit_int8):
            return _int8_choice(pick_int8(path, int8, asked=True), path)
        return BackendChoice(backend, path, f"{backend} (asked for)")
    if suffix != ".onnx":
        if suffix not in SUFFIXES:
            backend_class(path)  # raises, naming the known suffixes
        name = SUFFIXES[suffix]
        return BackendChoice(name, path, f"{name} (the backend for {suffix} files)")
    kind = parse_device(device).kind
    if kind == "cuda" or (kind == "auto" and precision is None and not explicit_int8 and _ort_has_cuda()):
        return BackendChoice("onnxruntime", path, "onnxruntime (GPU device)")
    if precision == "fp32":
        return BackendChoice("onnxruntime", path, "onnxruntime (fp32 asked for)")
    note = ""
    if precision in (None, "int8"):
        pick = pick_int8(path, int8, asked=precision == "int8")
        if pick.ir is not None or precision == "int8":
            return _int8_choice(pick, path)
        note = f"; {pick.reason}" if pick.reason else ""
    why_not = _openvino_here()
    if why_not is None:
        return BackendChoice("openvino", path, f"openvino bf16 (auto: the fastest CPU backend within tolerance here{note})")
    if precision == "bf16":
        raise ValueError(f"precision bf16 asked for, but OpenVINO bf16 cannot run here: {why_not}")
    return BackendChoice("onnxruntime", path, f"onnxruntime fp32 (auto: {why_not}{note})")


def _int8_choice(pick: Any, model: Path) -> BackendChoice:
    """The int8 IR :func:`engine.backends.int8.pick_int8` found, or ValueError saying why there is none."""
    if pick.ir is None:
        raise ValueError(f"precision int8 asked for {model}, but {pick.reason}")
    return BackendChoice("openvino", pick.ir, pick.reason)


def choose_backend(
    path: str | Path, device: str = "auto", backend: str | None = None, precision: str | None = None,
    int8: str | Path = "auto",
) -> tuple[str, str]:
    """(backend, why) of :func:`select_backend` (the file it runs aside)."""
    choice = select_backend(path, device, backend, precision, int8)
    return choice.backend, choice.reason


def load_backend(
    path: str | Path, device: str = "auto", backend: str | None = None, precision: str | None = None,
    int8: str | Path = "auto", **options: Any
) -> Backend:
    """Loads a model file with the backend :func:`select_backend` picks (or ``backend``).

    Args:
        path: ``.engine``/``.plan``, ``.onnx``, ``.xml`` (OpenVINO IR) or ``.pt`` file.
        device: ``auto`` (GPU when the backend can use one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        backend: ``auto``/None, or force ``onnxruntime``, ``openvino``, ``tensorrt``, ``torch``.
        precision: ask for a precision (``fp32``, ``bf16``, ``int8``, ``fp16``) where the backend has a choice.
        int8: for an ``.onnx`` on the CPU, ``auto`` (run the int8 IR beside it where it may: see
            :mod:`engine.backends.int8`), ``off``, or the path of an int8 IR to run.
        options: backend-specific settings (e.g. ``threads`` for ONNX Runtime or OpenVINO on the CPU).

    The chosen backend's ``selection`` attribute says why it was chosen (and which file it runs).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, or a corrupt/foreign file.
        BackendUnavailable: the runtime or device is missing here; the message says how to fix it.
    """
    path = Path(path)
    choice = select_backend(path, device, backend, precision, int8)
    name, why = choice.backend, choice.reason
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    if precision is not None:
        if name == "onnxruntime" and precision != "fp32":
            raise ValueError(f"precision {precision}: ONNX Runtime runs the graph in its own precision (fp32 or an FP16 export)")
        if name in ("openvino", "torch"):
            options["precision"] = precision
    loaded = _import_class(name)(choice.path, device=device, **options)
    loaded.selection = why
    return loaded


__all__ = [
    "BACKENDS", "BACKEND_CHOICES", "Backend", "BackendChoice", "BackendUnavailable", "InspectionResult", "SUFFIXES",
    "check_frames", "choose_backend", "load_backend", "result_from_outputs", "select_backend",
]
