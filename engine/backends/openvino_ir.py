"""The OpenVINO model file: reading an ``.onnx`` or IR into an ``ov.Model``, and the inspection
metadata and build facts an IR written by ``engine build --target openvino`` carries in its rt_info.

Apart from :mod:`engine.backends.openvino` (which runs the model) so that whoever only reads an
IR's facts (the int8 choice of :mod:`engine.backends.int8`, ``engine info``, ``bench``) does not
load the backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.devices import BackendUnavailable
from engine.metadata import PREFIX, ModelMetadata

#: rt_info sections of an IR written by ``engine build --target openvino``.
META_SECTION = "inspection"
BUILD_SECTION = "inspection_build"
INSTALL_HINT = "pip install 'strip-inspection[cpu]' (or pip install openvino)"


def import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable(f"openvino is not installed ({exc}): {INSTALL_HINT}") from exc
    return ov


def read_model(path: str | Path) -> Any:
    """``.onnx`` or ``.xml`` (with its ``.bin``) -> ``ov.Model``; ValueError naming the file when unreadable."""
    ov = import_openvino()
    path = Path(path)
    if path.suffix.lower() == ".xml" and not path.with_suffix(".bin").is_file():
        raise FileNotFoundError(f"{path}: the IR's weights {path.with_suffix('.bin').name} are missing beside it")
    if path.suffix.lower() == ".onnx":
        from engine.metadata import read_onnx_metadata

        try:
            read_onnx_metadata(str(path))  # a corrupt or foreign file fails here, with the onnx package's reason
        except ValueError as exc:
            reason = str(exc).removeprefix(f"{path}: ").removeprefix(f"{path} ")
            raise ValueError(f"{path}: OpenVINO cannot load this model ({reason})") from exc
    try:
        return ov.Core().read_model(str(path))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses for bad files
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and "Exception from" not in line]
        raise ValueError(f"{path}: OpenVINO cannot load this model ({lines[0] if lines else type(exc).__name__})") from exc


def _section(model: Any, name: str) -> dict[str, str] | None:
    if not model.has_rt_info([name]):
        return None
    entries = model.get_rt_info([name]).astype(dict)
    return {k: (v.astype(str) if hasattr(v, "astype") else str(v)) for k, v in entries.items()}


def model_metadata(model: Any, source: str) -> ModelMetadata:
    """The inspection metadata an ``ov.Model`` carries: the IR's ``inspection`` rt_info section, or,
    for a model read from ONNX, its ``metadata_props`` (which OpenVINO files under ``framework``)."""
    own = _section(model, META_SECTION)
    if own is not None:
        return ModelMetadata.from_onnx_props({PREFIX + k: v for k, v in own.items()}, source=source)
    return ModelMetadata.from_onnx_props(_section(model, "framework") or {}, source=source)


def build_info(model: Any) -> dict[str, Any]:
    """The ``inspection_build`` section of an IR (precision, parity report...), JSON-decoded; {} if none."""
    return {k: json.loads(v) for k, v in (_section(model, BUILD_SECTION) or {}).items()}


def write_metadata(model: Any, meta: ModelMetadata, build: dict[str, Any]) -> None:
    """Puts the metadata (one JSON value per field) and the build facts into the model's rt_info.

    The copy of the ONNX ``metadata_props`` OpenVINO keeps under ``framework`` is dropped: one
    description per artifact (its precision would say fp32 for an int8 IR).
    """
    rt_info = model.get_rt_info()
    if "framework" in list(rt_info.keys()):
        del rt_info["framework"]
    for key, value in meta.to_onnx_props().items():
        model.set_rt_info(value, [META_SECTION, key[len(PREFIX):]])
    for key, value in build.items():
        model.set_rt_info(json.dumps(value), [BUILD_SECTION, key])
