"""Model metadata: the one description of a model that travels inside every artifact.

ONNX files carry it in ``metadata_props`` (one key per field, JSON-encoded values, prefixed
``inspection.``); TensorRT engines carry it in a JSON sidecar (``model.engine.json``) written by
``engine build``. Thresholds and minimum areas live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from engine.decision import DEFAULT_MIN_AREA, DEFAULT_THRESHOLD

log = logging.getLogger(__name__)

PREFIX = "inspection."
DEFAULT_CLASS_NAMES = ("pits/dents", "stains", "scratches", "cracks/scabs")
#: Flip test-time augmentation inside the graph: the mean of the network's probabilities over these
#: views of each frame (each flipped back). ``hvflip`` is the frame, its horizontal and its vertical flip.
TTA_MODES = ("none", "hflip", "hvflip")
#: Segmentation networks (smp decoders) a fold can be: both export into the same inspection graph.
ARCHS = ("unet", "fpn")
#: How a gate head pools the encoder's features over the frame (smp's ClassificationHead ``pooling``).
GATE_POOLING = ("max", "avg")
#: Compute precisions of the U-Nets in an artifact: fp32/fp16 graphs and engines, bf16/int8 OpenVINO IRs.
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def class_ids(num_classes: int) -> list[int]:
    """The class ids of a model of ``num_classes`` classes: 1..C (0 is no defect, as in Severstal's CSV)."""
    return list(range(1, num_classes + 1))


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """Severstal's four names for four classes, else ``class 1`` ... ``class C``."""
    if num_classes == len(DEFAULT_CLASS_NAMES):
        return DEFAULT_CLASS_NAMES
    return tuple(f"class {k}" for k in class_ids(num_classes))


def project_version() -> str:
    """The installed project's version (``0+unknown`` when run from an uninstalled tree)."""
    try:
        from importlib.metadata import version

        return version("strip-inspection")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return "0+unknown"


@dataclass
class ModelMetadata:
    """What a consumer of an exported model needs to know about it.

    Attributes:
        num_classes: number of defect classes C; class ids are 1..C.
        class_names: one human-readable name per class.
        input_height, input_width: the camera frame size the graph takes (``frames`` is
            uint8 ``[N, input_height, input_width]``).
        train_height, train_width: the resolution the U-Nets ran at during training.
        thresholds: per-class probability threshold; a pixel is a defect when ``p >= t``.
        min_areas: per-class minimum pixel count (at input resolution) for a class to be present.
        folds: number of fold models averaged in the graph.
        checkpoint_sha256: sha256 of each fold checkpoint, in fold order.
        encoder: the U-Net encoder name (e.g. ``resnet34``).
        arch: the segmentation network (``unet``, ``fpn``).
        in_channels: channels the U-Net takes (1 = grayscale).
        mean, std: input normalisation after scaling to 0..1: ``x = (frame / 255 - mean) / std``.
        precision: the U-Nets' compute precision, one of :data:`PRECISIONS`.
        model_version: identifies this model (run name and checkpoint hash prefix).
        project_version: version of this software that wrote the artifact.
        drift_reference: reference statistics for drift monitoring, or ``None``.
        tta: flip test-time augmentation the graph applies (one of :data:`TTA_MODES`).
        gate_thresholds: per-class threshold of the folds' gate heads (their mean class probability);
            when set, a class is present only when its count reaches its minimum area and its class
            probability reaches this; None = no gate.
    """

    num_classes: int = 4
    class_names: list[str] = field(default_factory=lambda: list(DEFAULT_CLASS_NAMES))
    input_height: int = 256
    input_width: int = 1600
    train_height: int = 128
    train_width: int = 800
    thresholds: list[float] = field(default_factory=lambda: [DEFAULT_THRESHOLD] * len(DEFAULT_CLASS_NAMES))
    min_areas: list[int] = field(default_factory=lambda: [DEFAULT_MIN_AREA] * len(DEFAULT_CLASS_NAMES))
    folds: int = 1
    checkpoint_sha256: list[str] = field(default_factory=list)
    encoder: str = "resnet34"
    arch: str = "unet"
    in_channels: int = 1
    mean: float = 0.0
    std: float = 1.0
    precision: str = "fp32"
    model_version: str = "unversioned"
    project_version: str = field(default_factory=project_version)
    drift_reference: dict[str, Any] | None = None
    tta: str = "none"
    gate_thresholds: list[float] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        c = self.num_classes
        if c < 1:
            raise ValueError(f"num_classes must be >= 1, got {c}")
        for name in ("class_names", "thresholds", "min_areas"):
            if len(getattr(self, name)) != c:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected one per class ({c})")
        if any(not 0.0 < t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must lie strictly between 0 and 1, got {self.thresholds}")
        if any(a < 0 for a in self.min_areas):
            raise ValueError(f"min_areas must be >= 0, got {self.min_areas}")
        for name in ("input_height", "input_width", "train_height", "train_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.gate_thresholds is not None and (len(self.gate_thresholds) != c
                                                 or any(not 0.0 <= t <= 1.0 for t in self.gate_thresholds)):
            raise ValueError(f"gate_thresholds must be {c} values in [0, 1], got {self.gate_thresholds}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")

    @property
    def class_ids(self) -> list[int]:
        return class_ids(self.num_classes)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.input_height, self.input_width

    @property
    def train_size(self) -> tuple[int, int]:
        return self.train_height, self.train_width

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("ignoring unknown model metadata fields %s (written by a newer version?)", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_onnx_props(self) -> dict[str, str]:
        """One ``metadata_props`` entry per field, JSON-encoded."""
        return {PREFIX + k: json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_onnx_props(cls, props: dict[str, str], source: str = "model") -> ModelMetadata:
        fields = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if not fields:
            raise ValueError(
                f"{source} carries no inspection metadata ({PREFIX}* metadata_props): "
                "was it written by 'trainer export'?"
            )
        try:
            data = {k: json.loads(v) for k, v in fields.items()}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: malformed inspection metadata: {exc}") from exc
        return cls.from_dict(data)


def read_onnx_metadata(path: str) -> ModelMetadata:
    """Reads the metadata of an ONNX file without loading its weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for bad files
        raise ValueError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    return ModelMetadata.from_onnx_props({p.key: p.value for p in model.metadata_props}, source=str(path))
