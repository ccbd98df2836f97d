"""Model metadata: validation and the ONNX metadata_props round trip."""

from __future__ import annotations

import pytest

from engine.metadata import PREFIX, ModelMetadata


def test_onnx_props_round_trip_keeps_every_field():
    meta = ModelMetadata(
        num_classes=2, class_names=["a", "b"], input_height=64, input_width=320, train_height=32,
        train_width=160, thresholds=[0.4, 0.6], min_areas=[10, 0], folds=2, checkpoint_sha256=["ab", "cd"],
        encoder="resnet18", precision="fp16", model_version="run-1", drift_reference={"mean": [1.0, 2.0]},
    )
    props = meta.to_onnx_props()
    assert all(k.startswith(PREFIX) for k in props) and all(isinstance(v, str) for v in props.values())
    assert ModelMetadata.from_onnx_props(props) == meta


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"thresholds": [0.5] * 3}, "thresholds has 3 entries"),
        ({"min_areas": [200] * 5}, "min_areas has 5 entries"),
        ({"thresholds": [0.5, 0.5, 1.0, 0.5]}, "strictly between 0 and 1"),
        ({"min_areas": [200, -1, 200, 200]}, "min_areas must be >= 0"),
        ({"precision": "int4"}, "precision must be one of fp32, fp16, bf16, int8"),
        ({"input_width": 0}, "input_width must be positive"),
    ],
)
def test_invalid_metadata_is_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelMetadata(**fields)


def test_props_without_inspection_metadata_are_rejected():
    with pytest.raises(ValueError, match="written by 'trainer export'"):
        ModelMetadata.from_onnx_props({"producer": "x"}, source="foreign.onnx")


def test_unknown_fields_from_newer_writers_are_ignored():
    data = ModelMetadata().to_dict() | {"added_in_a_later_version": 1}
    assert ModelMetadata.from_dict(data) == ModelMetadata()
