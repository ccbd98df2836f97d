"""Which int8 OpenVINO IR, if any, runs in place of an ``.onnx`` inspection graph on the CPU.

``engine build --target openvino --precision int8 --onnx model.onnx --calibration DIR --out
model.int8.xml`` writes the IR beside the graph under the name :func:`int8_ir_path` gives (the one
place that name is spelled). The automatic backend choice (:func:`engine.backends.select_backend`)
runs that IR instead of the graph when all of these hold:

- the CPU has native int8 dot products (VNNI or AMX-INT8; :func:`engine.cpu.supports_int8`, which
  ``STRIP_CPU_INT8`` forces either way);
- the IR was built from this very graph (the sha256 of the ``.onnx`` it recorded matches): an IR
  left beside a re-exported model is stale;
- its recorded parity against the fp32 graph passed, under the default int8 limits
  (``toolchain.parity.INT8_TOLERANCE``). An IR that passed only under ``--tolerance`` overrides
  runs when pointed to, never by itself.

The ``int8`` setting (``server serve --int8-ir``): ``auto`` (the rules above), ``off`` (never), or
the path of an IR, which then runs on any CPU provided it was built from this graph and its
recorded parity passed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import engine.cpu as cpu
from engine.hashing import file_sha256

INT8_IR_SUFFIX = ".int8.xml"
#: The ``int8`` settings that are not a path.
INT8_MODES = ("auto", "off")


def int8_ir_path(model: str | Path) -> Path:
    """Where the int8 IR of ``model`` sits: ``model.onnx`` -> ``model.int8.xml`` beside it."""
    model = Path(model)
    return model.with_name(model.stem + INT8_IR_SUFFIX)


def build_command(model: Path, calibration: str = "DIR") -> str:
    """The command that builds the int8 IR of ``model`` where :func:`int8_ir_path` looks for it."""
    return (f"engine build --target openvino --precision int8 --onnx {model} --calibration {calibration} "
            f"--out {int8_ir_path(model)}")


@dataclass(frozen=True)
class Int8Pick:
    """The outcome of :func:`pick_int8`: the IR to run (or None), and why (empty: nothing to say)."""

    ir: Path | None
    reason: str


def parity_line(parity: dict[str, Any]) -> str:
    """The recorded parity in a few words (the choice's log line)."""
    return (f"parity vs the fp32 graph on {parity.get('frames')} held-out frames: mask Dice "
            f"{parity.get('mask_dice', 0.0):.4f}, labels agree {parity.get('present_agreement', 0.0):.3f}")


def ir_verdict(ir: Path, model: Path, need_default_tolerance: bool) -> tuple[str | None, dict[str, Any]]:
    """(None when ``ir`` may run in place of ``model``, else why not; the IR's recorded build facts)."""
    from engine.backends.openvino_ir import build_info, read_model

    if not ir.is_file():
        return f"{ir}: no such file", {}
    try:
        build = build_info(read_model(ir))
    except (ValueError, FileNotFoundError) as exc:
        return str(exc), {}
    if build.get("precision") != "int8":
        return f"{ir.name} is not an int8 IR (built as {build.get('precision', 'unknown')})", build
    if not model.is_file():
        return f"{model}: no such model file", build
    if build.get("onnx_sha256") != file_sha256(model):
        return f"{ir.name} was built from another graph than {model.name} (stale: rebuild it)", build
    parity = build.get("parity") or {}
    if not parity.get("passed"):
        return f"{ir.name}: no passed parity against the fp32 graph is recorded in it", build
    if need_default_tolerance and "default_tolerance" not in build:
        return f"{ir.name} records no parity limits (built by an older engine build): rebuild it", build
    if need_default_tolerance and not build["default_tolerance"]:
        return (f"{ir.name} passed its parity only under loosened limits (engine build --tolerance): it runs "
                "only when pointed to"), build
    return None, build


def pick_int8(model: str | Path, int8: str | Path = "auto", asked: bool = False) -> Int8Pick:
    """The int8 IR to run for the ``.onnx`` ``model`` on the CPU, if any (see the module docstring).

    ``asked``: precision int8 was asked for (the CPU check is waived, a missing IR is explained).

    Raises:
        ValueError: ``int8`` names an IR that may not run in place of ``model`` (saying why).
    """
    model, setting = Path(model), str(int8)
    if setting == "off":
        return Int8Pick(None, "int8 switched off")
    explicit = setting not in INT8_MODES
    ir = Path(setting) if explicit else int8_ir_path(model)
    if not explicit and not ir.is_file():
        return Int8Pick(None, f"no int8 IR {ir.name} beside {model.name}: int8 needs a quantised IR: "
                              f"{build_command(model)}" if asked else "")
    if importlib.util.find_spec("openvino") is None:
        if explicit:
            raise ValueError(f"int8 IR {ir}: openvino is not installed (pip install 'strip-inspection[cpu]')")
        return Int8Pick(None, f"{ir.name} not used: openvino is not installed")
    why_not, build = ir_verdict(ir, model, need_default_tolerance=not explicit)
    if why_not is not None:
        if explicit:
            raise ValueError(f"int8 IR {ir}: {why_not}")
        return Int8Pick(None, f"{ir.name} not used: {why_not}")
    if not (explicit or asked or cpu.supports_int8()):
        return Int8Pick(None, f"{ir.name} not used: {cpu.no_int8_reason()}")
    auto = f"auto: int8 forced by {cpu.INT8_ENV}=1" if cpu.int8_forced() else "auto: the CPU has native int8"
    how = "pointed to" if explicit else "int8 asked for" if asked else auto
    features = cpu.cpu_features()
    slow = "" if features.int8 else f"; slow on this CPU without VNNI or AMX-INT8: {features.line()}"
    return Int8Pick(ir, f"openvino int8 IR {ir.name} ({how}; {parity_line(build['parity'])}{slow})")
