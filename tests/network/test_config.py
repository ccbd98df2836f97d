"""network.config.UNetConfig: the one validator of a network's configuration, each rule naming its key."""

from __future__ import annotations

import pytest

from network.config import DEFAULT_DECODER_CHANNELS, UNetConfig, default_decoder_channels


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"encoder": "vgg11"}, "encoder"),
        ({"arch": "deeplab"}, "arch"),
        ({"gate_pooling": "median"}, "gate_pooling"),
        ({"encoder_depth": 0, "decoder_channels": ()}, "encoder_depth"),
        ({"encoder_depth": 6, "decoder_channels": (8,) * 6}, "encoder_depth"),
        ({"arch": "fpn", "encoder_depth": 2, "decoder_channels": (64, 32)}, "encoder_depth"),
        ({"encoder_depth": 3, "decoder_channels": (64, 32)}, "decoder_channels"),
        ({"arch": "fpn", "encoder_depth": 3, "decoder_channels": (64, 48, 16)}, "decoder_channels[1]"),
        ({"encoder_depth": 3, "decoder_channels": (64, 0, 16)}, "decoder_channels"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_each_rule_names_its_key(fields, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        UNetConfig(**fields)


def test_valid_configs_round_trip_through_their_dict():
    fpn = UNetConfig(encoder="resnet18", arch="fpn", encoder_depth=3, decoder_channels=[64, 32, 16], gate=True,
                     gate_pooling="max")
    assert fpn.decoder_channels == (64, 32, 16)  # a list from JSON becomes a tuple
    assert UNetConfig.from_dict(fpn.to_dict()) == fpn
    assert UNetConfig().decoder_channels == DEFAULT_DECODER_CHANNELS
    assert default_decoder_channels(3) == DEFAULT_DECODER_CHANNELS[:3]
    with pytest.raises(TypeError):
        UNetConfig.from_dict({**fpn.to_dict(), "unknown": 1})
