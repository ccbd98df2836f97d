"""Where the inspection graph's decision starts: the low-resolution mean probabilities it resizes,
thresholds and counts, found in the graph itself.

The exported graph ends with ``probs = resize(mean of the folds' probabilities)`` (half-pixel
bilinear, back to the camera frame), ``masks = probs >= thresholds``, ``counts = sum(masks)``
and ``present = counts >= min_areas`` (``& gate >= gate_thresholds`` with a gate head). The CPU
backends run the graph up to the tensor that resize reads (:attr:`PostCut.probs`, at the training
resolution) and the gate's mean probabilities, and make the decision with
:class:`engine.fastpost.FastPostprocess`, which computes the same resize, compare and count in
one pass. :func:`find_post_cut` walks the graph back from its outputs and checks each step is what
that kernel reproduces: a resize other than half-pixel bilinear without antialiasing, a threshold
the metadata does not state, or any other shape of graph makes it raise
:class:`FastPathUnavailable`, and the backend runs the whole graph instead. The graph stays whole
on disk, the one definition (TensorRT and the parity checks run it as it is).

One walker serves both runtimes' views of the graph: :class:`OnnxView` (an ``onnx.ModelProto``,
for ONNX Runtime) and :class:`OpenVinoView` (an ``ov.Model`` read from ``.onnx`` or an IR).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from engine import graph
from engine.metadata import ModelMetadata

#: Keys under which a cut graph's two outputs are passed on (the low-resolution probabilities, the gate's).
LOWRES_KEY = "lowres_probs"
GATE_KEY = "gate_probs"


class FastPathUnavailable(ValueError):
    """The graph's post-processing is not the one the fast CPU kernel reproduces (the message says why)."""


@dataclass(frozen=True)
class Node:
    """One graph node as the walker sees it: its ONNX op type, input tensors and normalised attributes."""

    op: str
    inputs: tuple[Any, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


class GraphView(Protocol):
    """A runtime's graph, read through ONNX op names (the adapters translate)."""

    def output(self, name: str) -> Any:
        """The tensor behind the graph output ``name``."""

    def producer(self, tensor: Any) -> Node | None:
        """The node writing ``tensor``; None for graph inputs and constants."""

    def constant(self, tensor: Any) -> np.ndarray | None:
        """The value of a constant tensor, else None."""

    def same(self, a: Any, b: Any) -> bool:
        """Whether two tensor handles are one tensor."""


@dataclass(frozen=True)
class PostCut:
    """Where the decision starts in one graph (tensors as the view names them).

    Attributes:
        probs: the mean fold probabilities ``[N, C, h, w]`` the resize reads (or, when the graph has
            no resize because it runs at the camera's resolution, the probabilities compared).
        gate: the gate heads' mean probabilities ``[N, C]``, or None for a graph without a gate.
        resized: whether a half-pixel bilinear resize lies between ``probs`` and the threshold.
    """

    probs: Any
    gate: Any | None
    resized: bool


_FLOAT_CASTS = ("float32",)


def _through_casts(view: GraphView, tensor: Any, allowed: Sequence[str] | None) -> tuple[Any, Node | None]:
    """Follows ``tensor`` back through Cast/Identity nodes (to ``allowed`` dtypes; None: any);
    returns the first tensor not written by one and its producer."""
    node = view.producer(tensor)
    while node is not None and (node.op == "Identity" or (node.op == "Cast" and (allowed is None or node.attrs.get("to") in allowed))):
        tensor = node.inputs[0]
        node = view.producer(tensor)
    return tensor, node


def _check_constant(view: GraphView, tensor: Any, expected: Sequence[float], dtype: str, what: str) -> None:
    """Raises unless ``tensor`` is a constant (possibly reshaped or cast) equal to ``expected`` as ``dtype``."""
    node = view.producer(tensor)
    while node is not None and node.op in ("Reshape", "Unsqueeze", "Cast", "Identity"):
        tensor = node.inputs[0]
        node = view.producer(tensor)
    value = view.constant(tensor)
    want = np.asarray(expected, dtype=dtype)
    if value is None:
        raise FastPathUnavailable(f"the graph's {what} are not a constant")
    got = np.asarray(value).reshape(-1)
    if got.shape != want.shape or not np.array_equal(got.astype(dtype), want):
        raise FastPathUnavailable(f"the graph's {what} {got.tolist()} differ from its metadata's {want.tolist()}")


def _compare(view: GraphView, tensor: Any, what: str) -> Node:
    node = view.producer(tensor)
    if node is None or node.op != "GreaterOrEqual":
        raise FastPathUnavailable(f"{what} is not made by a GreaterOrEqual (found {node.op if node else 'none'})")
    return node


def _probs_before_resize(view: GraphView, compared: Any) -> tuple[Any, bool]:
    """The tensor a half-pixel bilinear resize reads to make ``compared`` (and True), or ``compared``
    itself (and False) where no resize lies between."""
    source, node = _through_casts(view, compared, _FLOAT_CASTS)
    if node is None or node.op != "Resize":
        return source, False
    mode, transform = node.attrs.get("mode"), node.attrs.get("coordinate_transformation_mode")
    if (mode, transform, node.attrs.get("antialias", 0), node.attrs.get("by_sizes")) != ("linear", "half_pixel", 0, True):
        raise FastPathUnavailable(
            f"the resize back to the frame is {mode}/{transform} (antialias {node.attrs.get('antialias')}, "
            f"by sizes {node.attrs.get('by_sizes')}), not half-pixel bilinear by sizes without antialiasing")
    return node.inputs[0], True


def find_post_cut(view: GraphView, meta: ModelMetadata) -> PostCut:
    """Finds where the decision starts in an inspection graph, and checks the decision is the one
    :class:`engine.fastpost.FastPostprocess` makes with ``meta``'s thresholds, minimum areas and gate.

    Raises:
        FastPathUnavailable: the graph decides some other way (the message says what differs).
    """
    _, mask_node = _through_casts(view, view.output(graph.MASKS.name), None)
    if mask_node is None or mask_node.op != "GreaterOrEqual":
        raise FastPathUnavailable("the masks are not a threshold of probabilities")
    _check_constant(view, mask_node.inputs[1], meta.thresholds, "float32", "thresholds")
    probs, resized = _probs_before_resize(view, mask_node.inputs[0])
    present = view.producer(view.output(graph.PRESENT.name))
    gate = None
    if present is not None and present.op == "And":
        first, second = (_compare(view, t, "a presence test") for t in present.inputs)
        area, gated = (first, second) if _is_counts(view, first.inputs[0]) else (second, first)
        if meta.gate_thresholds is None:
            raise FastPathUnavailable("the graph gates presence, but its metadata has no gate thresholds")
        _check_constant(view, gated.inputs[1], meta.gate_thresholds, "float32", "gate thresholds")
        gate = gated.inputs[0]
    else:
        area = _compare(view, view.output(graph.PRESENT.name), graph.PRESENT.name)
        if meta.gate_thresholds is not None:
            raise FastPathUnavailable("the metadata has gate thresholds, but the graph does not gate presence")
    if not _is_counts(view, area.inputs[0]):
        raise FastPathUnavailable("presence does not compare the counts with the minimum areas")
    _check_constant(view, area.inputs[1], meta.min_areas, "int64", "minimum areas")
    return PostCut(probs=probs, gate=gate, resized=resized)


def _is_counts(view: GraphView, tensor: Any) -> bool:
    return view.same(tensor, view.output(graph.COUNTS.name))


# --------------------------------------------------------------------------- ONNX


class OnnxView:
    """An ``onnx.ModelProto`` as a :class:`GraphView` (tensors are names)."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self._numpy = numpy_helper.to_array
        self.model = model
        self._producers = {out: node for node in model.graph.node for out in node.output}
        self._initializers = {init.name: init for init in model.graph.initializer}

    def output(self, name: str) -> str:
        return name

    def same(self, a: str, b: str) -> bool:
        return a == b

    def producer(self, tensor: str) -> Node | None:
        node = self._producers.get(tensor)
        if node is None or node.op_type == "Constant":
            return None
        attrs = {a.name: _onnx_attribute(a) for a in node.attribute}
        if node.op_type == "Cast":
            attrs["to"] = graph.onnx_dtype(attrs.get("to", 0))
        if node.op_type == "Resize":
            inputs = list(node.input) + [""] * (4 - len(node.input))
            attrs["by_sizes"] = bool(inputs[3]) and not inputs[2] and "axes" not in attrs
        return Node(node.op_type, tuple(node.input), attrs)

    def constant(self, tensor: str) -> np.ndarray | None:
        if tensor in self._initializers:
            return self._numpy(self._initializers[tensor])
        node = self._producers.get(tensor)
        if node is not None and node.op_type == "Constant":
            values = [a for a in node.attribute if a.name == "value"]
            return self._numpy(values[0].t) if values else None
        return None


def _onnx_attribute(attribute: Any) -> Any:
    from onnx import helper

    value = helper.get_attribute_value(attribute)
    return value.decode() if isinstance(value, bytes) else value


def cut_onnx(model: Any, cut: PostCut) -> Any:
    """A copy of ``model`` computing only :data:`LOWRES_KEY` (and :data:`GATE_KEY`) from the frames:
    the nodes those need, nothing after them. The tensors keep their names in the copy."""
    import onnx
    from onnx import TensorProto, helper

    wanted = [cut.probs] + ([cut.gate] if cut.gate is not None else [])
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    g = pruned.graph
    needed, kept = set(wanted), []
    for node in reversed(list(g.node)):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del g.node[:]
    g.node.extend(reversed(kept))
    initializers = [init for init in g.initializer if init.name in needed]
    del g.initializer[:]
    g.initializer.extend(initializers)
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in wanted)
    del g.value_info[:]
    return pruned


# --------------------------------------------------------------------------- OpenVINO


_OV_OPS = {"GreaterEqual": "GreaterOrEqual", "LogicalAnd": "And", "Convert": "Cast", "Interpolate": "Resize"}


class OpenVinoView:
    """An ``ov.Model`` as a :class:`GraphView` (tensors are ``ov.Output`` ports). OpenVINO's op names
    and Interpolate attributes are translated to ONNX's (``linear_onnx`` is ONNX's ``linear``)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def output(self, name: str) -> Any:
        for out in self.model.outputs:
            if name in out.get_names():
                return out.get_node().input_value(0) if out.get_node().get_type_name() == "Result" else out
        raise FastPathUnavailable(f"the model has no output {name!r}")

    def same(self, a: Any, b: Any) -> bool:
        return a.get_node() is b.get_node() or (
            a.get_node().get_friendly_name() == b.get_node().get_friendly_name() and a.get_index() == b.get_index())

    def producer(self, tensor: Any) -> Node | None:
        op = tensor.get_node()
        kind = op.get_type_name()
        if kind in ("Parameter", "Constant"):
            return None
        attrs = dict(op.get_attributes())
        if kind == "Convert":
            attrs = {"to": _ov_dtype(op.get_output_element_type(0))}
        if kind == "Interpolate":
            attrs = {"mode": {"linear_onnx": "linear"}.get(attrs.get("mode"), attrs.get("mode")),
                     "coordinate_transformation_mode": attrs.get("coordinate_transformation_mode"),
                     "antialias": int(bool(attrs.get("antialias", False))),
                     "by_sizes": attrs.get("shape_calculation_mode") == "sizes"
                     and not any(attrs.get("pads_begin", [])) and not any(attrs.get("pads_end", []))}
        return Node(_OV_OPS.get(kind, kind), tuple(i.get_source_output() for i in op.inputs()), attrs)

    def constant(self, tensor: Any) -> np.ndarray | None:
        op = tensor.get_node()
        return np.asarray(op.get_data()) if op.get_type_name() == "Constant" else None


def _ov_dtype(element_type: Any) -> str:
    return {"f32": "float32", "u8": "uint8", "i32": "int32", "i64": "int64", "boolean": "bool",
            "f16": "float16"}.get(element_type.get_type_name(), element_type.get_type_name())


def load_onnx_cut(path: str) -> tuple[ModelMetadata, bytes, list[str]]:
    """An ``.onnx`` inspection graph cut where its decision starts (see :func:`cut_onnx`).

    Returns:
        (the model's metadata, the cut graph serialised, its output names: probabilities[, gate]).

    Raises:
        FastPathUnavailable: the file cannot be read here or decides otherwise (the whole graph runs,
            and reports a broken file in its own words).
        ValueError: an ONNX file that is not an inspection graph.
    """
    import onnx

    try:
        model = onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - onnx raises protobuf's own errors for bad files
        raise FastPathUnavailable(f"the onnx package cannot read it ({type(exc).__name__})") from exc
    meta = ModelMetadata.from_onnx_props({p.key: p.value for p in model.metadata_props}, source=path)

    def dtypes(values: Any) -> dict[str, str]:
        return {v.name: graph.onnx_dtype(v.type.tensor_type.elem_type) for v in values}

    outputs = dtypes(model.graph.output)
    graph.check_io(dtypes(model.graph.input), outputs, path)
    if graph.PROBS_NAME in outputs:
        raise FastPathUnavailable("the graph outputs its probabilities too (exported with --with-probs)")
    cut = find_post_cut(OnnxView(model), meta)
    names = [cut.probs] + ([cut.gate] if cut.gate is not None else [])
    return meta, cut_onnx(model, cut).SerializeToString(), names
