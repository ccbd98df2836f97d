"""A tiny inspection model whose defects are known pixels, for the "same answer" checks.

The random tiny U-Nets' defects depend on quantile thresholds of their near-0.5 outputs; the server
and camera tests compare every answer with this model's direct output instead, and assert that the
compared answers carry defects, so the checks cannot pass on empty masks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# --------------------------------------------------------------------------- a model that finds defects
# The random tiny U-Nets' defects depend on quantile thresholds of their near-0.5 outputs. The
# server's "same answer" checks run on a model whose defects are known pixels instead: a tiny U-Net
# whose weights pass the standardised frame straight through (one channel of each stage; every
# other weight zero) and whose head makes class 1 of bright pixels (scratches), class 2 of dark
# ones (pits), class 3 of the brightest (its minimum area too large: pixels, never present) and
# class 4 of none. ``toolchain.parity.synthetic_frames`` draws such scratches and pits.

BRIGHT, DARK, BRIGHTEST = 215, 45, 250  # grey levels where classes 1, 2, 3 begin
DEFECT_SLOPE = 12.0  # logit per standardised grey level: a steep step at each class's grey level
OFFSET = 8.0  # keeps the passed-through channel positive through every ReLU


def _pass_through(conv, bn, in_channel: int) -> None:
    """``conv`` copies input ``in_channel`` (centre tap) to output channel 0; ``bn`` adds nothing."""
    import torch

    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, in_channel, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.zero_()


def defect_unet(mean: float, std: float):
    """The tiny U-Net (``tests.fixtures.TINY_UNET``) whose mask logits step at known grey levels."""
    import torch

    from network.build import build_unet
    from network.config import UNetConfig
    from tests.fixtures import TINY_UNET

    net = build_unet(UNetConfig.from_dict(TINY_UNET)).eval()
    encoder, blocks = net.encoder, net.decoder.blocks
    _pass_through(encoder.conv1, encoder.bn1, 0)
    with torch.no_grad():
        encoder.bn1.bias[0] = OFFSET  # channel 0 of stage 1: standardised grey + OFFSET, at half size
        blocks[0].conv1[0].weight.zero_()  # the deeper stages reach no output
    _pass_through(blocks[1].conv1[0], blocks[1].conv1[1], blocks[0].conv2[0].out_channels)  # stage 1's skip
    for conv, bn in ((blocks[1].conv2[0], blocks[1].conv2[1]), (blocks[2].conv1[0], blocks[2].conv1[1]),
                     (blocks[2].conv2[0], blocks[2].conv2[1])):
        _pass_through(conv, bn, 0)
    head = net.segmentation_head[0]

    def level(grey: float) -> float:
        return (grey / 255.0 - mean) / std

    slopes = [DEFECT_SLOPE, -DEFECT_SLOPE, DEFECT_SLOPE, 0.0]  # class 2 grows as the grey level falls
    starts = [level(BRIGHT), level(DARK), level(BRIGHTEST), 0.0]
    with torch.no_grad():
        head.weight.zero_()
        for k, (slope, start) in enumerate(zip(slopes, starts)):
            head.weight[k, 0, 1, 1] = slope
            head.bias[k] = -slope * (start + OFFSET) if slope else -50.0  # class 4: never
    return net


@pytest.fixture(scope="session")
def defect_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fold of :func:`defect_unet` exported as an inspection graph: classes 1 and 2 present on
    some camera frames only, class 3 with pixels but never present, class 4 empty."""
    import json

    import torch

    from engine.metadata import DEFAULT_CLASS_NAMES
    from network.checkpoint import FoldFacts, save_fold_checkpoint
    from network.config import UNetConfig
    from tests.fixtures import TINY_INPUT_SIZE, TINY_TRAIN_SIZE, TINY_UNET
    from trainer.export import export_onnx

    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("defect_run") / "run"
    (run_dir / "fold0").mkdir(parents=True)
    cfg = UNetConfig.from_dict(TINY_UNET)
    facts = FoldFacts(fold=0, epoch=1, val_loss=0.5, input_size=TINY_INPUT_SIZE, train_size=TINY_TRAIN_SIZE,
                      class_names=tuple(DEFAULT_CLASS_NAMES[: cfg.num_classes]), mean=0.5, std=0.25)
    save_fold_checkpoint(run_dir / "fold0" / "best.pt", cfg, defect_unet(0.5, 0.25), facts)
    (run_dir / "config.json").write_text(json.dumps({"unet": cfg.to_dict(), "folds": 1}))
    # Minimum areas: class 1 and 2 present on some frames only (see test_the_defect_model_...),
    # class 3 never (more pixels than a frame has).
    postprocess = {"thresholds": [0.5] * 4, "min_areas": [400, 150, TINY_INPUT_SIZE[0] * TINY_INPUT_SIZE[1] + 1, 1]}
    (run_dir / "postprocess.json").write_text(json.dumps(postprocess))
    out = tmp_path_factory.mktemp("defect_onnx") / "model.onnx"
    export_onnx(run_dir, out)
    return out
