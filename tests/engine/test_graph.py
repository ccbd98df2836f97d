"""``engine.graph``: the one definition of the inspection graph's I/O, checked against a real export."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from engine import graph
from toolchain.info import describe_model


def test_exported_graph_matches_the_interface(tiny_onnx: Path) -> None:
    import onnxruntime as ort

    model = onnx.load(str(tiny_onnx))
    meta = describe_model(tiny_onnx)["metadata"]
    c, h, w = meta["num_classes"], meta["input_height"], meta["input_width"]
    dims = graph.static_dims(c, h, w)
    for value in [*model.graph.input, *model.graph.output]:
        shape = value.type.tensor_type.shape.dim
        assert shape[0].dim_param == "N"
        assert [d.dim_value for d in shape[1:]] == dims[value.name]
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    inputs = {i.name: graph.ort_dtype(i.type) for i in session.get_inputs()}
    outputs = {o.name: graph.ort_dtype(o.type) for o in session.get_outputs()}
    graph.check_io(inputs, outputs, str(tiny_onnx))  # does not raise
    assert list(outputs) == list(graph.OUTPUT_NAMES)
    assert graph.signature(c, h, w) == describe_model(tiny_onnx)["io"]


def test_check_io_names_what_is_wrong() -> None:
    good_out = {"masks": "uint8", "counts": "int32", "present": "bool"}
    graph.check_io({"frames": "uint8"}, {**good_out, "probs": "float32"}, "m.onnx")
    with pytest.raises(ValueError, match=r"m.onnx: not an inspection graph: inputs \['images'\]"):
        graph.check_io(["images"], list(good_out), "m.onnx")
    with pytest.raises(ValueError, match="outputs"):
        graph.check_io(["frames"], ["masks", "counts"], "m.onnx")
    with pytest.raises(ValueError, match="not an inspection engine"):
        graph.check_io(["frames"], [*good_out, "logits"], "m.engine", kind="inspection engine")
    with pytest.raises(ValueError, match="'counts' is int64, expected int32"):
        graph.check_io({"frames": "uint8"}, {**good_out, "counts": "int64"}, "m.onnx")
    with pytest.raises(ValueError, match="'frames' is float32, expected uint8"):
        graph.check_io({"frames": "float32"}, good_out, "m.onnx")


def test_shapes() -> None:
    assert graph.shape("masks", 3, 4, 256, 1600) == (3, 4, 256, 1600)
    assert graph.shape("counts", 3, 4, 256, 1600) == (3, 4)
    assert graph.shape("frames", "N", 4, 256, 1600) == ("N", 256, 1600)
    assert graph.ort_dtype("tensor(float)") == "float32"
