"""The network's configuration: the one validator of what a fold's U-Net/FPN may be.

:class:`UNetConfig` is stored in every fold checkpoint and ensemble bundle (as a dict) and is
what ``trainer fit`` builds from its flags, so every rule about a network's shape lives here and
nowhere else. torch-free: importing it costs nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.metadata import ARCHS, GATE_POOLING

# Encoders the product supports, by the name users type -> smp's encoder name. The thesis' set
# (ResNet-34/50/101, EfficientNet-B0..B7) plus ResNet-18, MobileNetV2 and timm's MobileNetV3-small
# (width 0.5 and 1.0), which make CPU training practical.
ENCODERS: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenetv3_small_050": "tu-mobilenetv3_small_050",
    "mobilenetv3_small_100": "tu-mobilenetv3_small_100",
    **{f"efficientnet-b{i}": f"efficientnet-b{i}" for i in range(8)},
}
#: Decoder widths per encoder stage (the thesis' U-Net); a depth-d network takes the first d.
DEFAULT_DECODER_CHANNELS: tuple[int, ...] = (256, 128, 64, 32, 16)
#: Encoder stages smp can run.
MAX_ENCODER_DEPTH = 5


def default_decoder_channels(encoder_depth: int) -> tuple[int, ...]:
    """The default decoder widths for a network of ``encoder_depth`` stages."""
    return DEFAULT_DECODER_CHANNELS[:encoder_depth]


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a fold's network from its state dict.

    ``arch`` ``fpn`` (smp's FPN) reads ``decoder_channels[0]`` as its pyramid width and
    ``decoder_channels[1]`` (else the same) as its segmentation width; it needs 3..5 encoder stages.
    ``gate`` adds smp's classification head on the encoder (``aux_params``): one presence logit per
    class, and the network returns ``(mask logits, class logits)``. ``gate_pooling`` is how that head
    pools the encoder's last features over the frame: ``max`` (a defect's evidence counts the same
    in a crop and in a whole frame; what ``trainer fit --gate`` builds) or ``avg`` (smp's default;
    checkpoints made before the setting existed).

    Raises:
        ValueError: on construction, for any rule broken, naming the key.
    """

    encoder: str = "resnet34"
    in_channels: int = 1
    num_classes: int = 4
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = DEFAULT_DECODER_CHANNELS
    arch: str = "unet"
    gate: bool = False
    gate_pooling: str = "avg"

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))
        self._check_choices()
        self._check_shape()

    def _check_choices(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder {self.encoder!r} is not supported; choose one of {', '.join(ENCODERS)}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.gate_pooling not in GATE_POOLING:
            raise ValueError(f"gate_pooling must be one of {', '.join(GATE_POOLING)}, got {self.gate_pooling!r}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    def _check_shape(self) -> None:
        depth, widths = self.encoder_depth, self.decoder_channels
        if not 1 <= depth <= MAX_ENCODER_DEPTH:
            raise ValueError(f"encoder_depth must be 1..{MAX_ENCODER_DEPTH}, got {depth}")
        if self.arch == "fpn" and not 3 <= depth <= MAX_ENCODER_DEPTH:
            raise ValueError(f"encoder_depth must be 3..{MAX_ENCODER_DEPTH} for arch fpn, got {depth}")
        if len(widths) != depth:
            raise ValueError(
                f"decoder_channels has {len(widths)} entries, expected one per encoder stage (encoder_depth {depth})")
        if any(int(w) < 1 for w in widths):
            raise ValueError(f"decoder_channels must be positive, got {list(widths)}")
        if self.arch == "fpn" and widths[min(1, len(widths) - 1)] % 32:
            raise ValueError(f"decoder_channels[1] (an FPN's segmentation width) must be a multiple of 32 (its "
                             f"GroupNorm has 32 groups), got decoder_channels {list(widths)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d
