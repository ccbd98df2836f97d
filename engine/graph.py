"""The inspection graph's interface: the one definition of its inputs' and outputs' names, dtypes
and shapes.

Export writes it (:func:`static_dims` for the ONNX signature), every backend checks a loaded
model against it (:func:`check_io`) and allocates its buffers from it (:func:`shape`), and
``engine info`` shows it. Dims are symbolic: ``N`` the batch, ``C`` the classes, ``H``/``W``
the camera frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the inspection graph.

    Attributes:
        name: the tensor's name in the graph.
        dtype: numpy dtype name (``uint8``, ``int32``, ``bool``, ``float32``).
        dims: symbolic dims, a subset of ``N``, ``C``, ``H``, ``W``, in order.
    """

    name: str
    dtype: str
    dims: tuple[str, ...]

    def shape(self, n: int | str, num_classes: int, height: int, width: int) -> tuple:
        """The concrete shape for a batch of ``n`` (``"N"`` keeps the batch symbolic)."""
        sizes = {"N": n, "C": num_classes, "H": height, "W": width}
        return tuple(sizes[d] for d in self.dims)


FRAMES = TensorSpec("frames", "uint8", ("N", "H", "W"))
MASKS = TensorSpec("masks", "uint8", ("N", "C", "H", "W"))
COUNTS = TensorSpec("counts", "int32", ("N", "C"))
PRESENT = TensorSpec("present", "bool", ("N", "C"))
#: Mean fold probabilities: only in graphs exported with ``--with-probs`` (debugging, parity).
PROBS = TensorSpec("probs", "float32", ("N", "C", "H", "W"))

INPUT_NAME = FRAMES.name
#: Outputs every inspection graph has, in order.
OUTPUTS: tuple[TensorSpec, ...] = (MASKS, COUNTS, PRESENT)
OUTPUT_NAMES: tuple[str, ...] = tuple(o.name for o in OUTPUTS)
#: Outputs a graph may have in addition.
OPTIONAL_OUTPUTS: tuple[TensorSpec, ...] = (PROBS,)
PROBS_NAME = PROBS.name
SPECS: dict[str, TensorSpec] = {s.name: s for s in (FRAMES, *OUTPUTS, *OPTIONAL_OUTPUTS)}
#: The fold U-Nets' nodes carry their module path in their names (the exporter names nodes after
#: modules: ``/folds.0/encoder/...``); everything else is pre- or post-processing, which runtimes
#: keep in fp32 (TensorRT's FP16 flag, OpenVINO bf16, NNCF INT8).
UNET_LAYER_MARK = "/folds."


def shape(name: str, n: int | str, num_classes: int, height: int, width: int) -> tuple:
    """Shape of the graph tensor ``name`` for a batch of ``n`` frames."""
    return SPECS[name].shape(n, num_classes, height, width)


def static_dims(num_classes: int, height: int, width: int) -> dict[str, list[int]]:
    """Every tensor's dims after the batch dim, as ints (what export writes into the ONNX signature)."""
    return {name: list(spec.shape(0, num_classes, height, width)[1:]) for name, spec in SPECS.items()}


def signature(num_classes: int, height: int, width: int, with_probs: bool = False) -> list[dict]:
    """The I/O table ``engine info`` shows (batch dim ``"N"``)."""
    outputs = [*OUTPUTS, *(OPTIONAL_OUTPUTS if with_probs else ())]
    return [
        {"name": s.name, "mode": mode, "dtype": s.dtype, "shape": list(s.shape("N", num_classes, height, width))}
        for mode, specs in (("input", [FRAMES]), ("output", outputs))
        for s in specs
    ]


def check_io(
    inputs: Sequence[str] | Mapping[str, str | None],
    outputs: Sequence[str] | Mapping[str, str | None],
    source: str,
    kind: str = "inspection graph",
) -> None:
    """Raises ValueError unless a runtime's I/O matches the inspection graph.

    Args:
        inputs, outputs: the runtime's tensor names, or ``{name: numpy dtype name}`` where the
            runtime reports dtypes (None = unknown, not checked).
        source: the model file, for the message.
        kind: what the file should be (``inspection graph``, ``inspection engine``...).
    """
    names_in, names_out = list(inputs), list(outputs)
    known = {o.name for o in (*OUTPUTS, *OPTIONAL_OUTPUTS)}
    if names_in != [INPUT_NAME] or any(o not in names_out for o in OUTPUT_NAMES) or set(names_out) - known:
        raise ValueError(
            f"{source}: not an {kind}: inputs {names_in}, outputs {names_out} (expected input {INPUT_NAME!r} "
            f"and outputs {', '.join(OUTPUT_NAMES)}, optionally {', '.join(o.name for o in OPTIONAL_OUTPUTS)})"
        )
    for table in (inputs, outputs):
        if not isinstance(table, Mapping):
            continue
        for name, dtype in table.items():
            if dtype is not None and dtype != SPECS[name].dtype:
                raise ValueError(f"{source}: not an {kind}: {name!r} is {dtype}, expected {SPECS[name].dtype}")


# ONNX Runtime reports types as "tensor(uint8)"; numpy names for the ones the graph uses.
_ORT_TYPES = {"tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(bool)": "bool",
              "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


def ort_dtype(type_text: str) -> str:
    """``"tensor(float)"`` -> ``"float32"`` (unknown types pass through, and fail :func:`check_io`)."""
    return _ORT_TYPES.get(type_text, type_text)


# ONNX's TensorProto element types, for the ones the graph uses.
_ONNX_TYPES = {1: "float32", 2: "uint8", 6: "int32", 7: "int64", 9: "bool", 10: "float16"}


def onnx_dtype(elem_type: int) -> str:
    """An ONNX ``TensorProto`` element type -> numpy dtype name (unknown ones as ``onnx type N``)."""
    return _ONNX_TYPES.get(elem_type, f"onnx type {elem_type}")
