"""The inspection model's pre- and post-processing: the torch mirror of the exported graph."""

from __future__ import annotations

import torch

from engine.metadata import ModelMetadata
from network.build import build_unet
from network.config import UNetConfig
from network.inspection import InspectionModel
from network.processing import downscale_masks, postprocess, preprocess, resize


def test_postprocess_counts_exactly_and_applies_per_class_rules():
    probs = torch.zeros(1, 3, 256, 1600)
    probs[0, 0, :100, :100] = 0.7  # 10,000 px above 0.5
    probs[0, 1, :10, :10] = 0.45  # below class 2's threshold 0.5
    probs[0, 2] = 0.9  # the whole frame: 409,600 px, exact although past fp16's 2048
    masks, counts, present = postprocess(probs, torch.tensor([0.5, 0.5, 0.8]), torch.tensor([10_001, 0, 200]))
    assert masks.dtype == torch.uint8 and counts.dtype == torch.int32 and present.dtype == torch.bool
    assert counts.tolist() == [[10_000, 0, 409_600]]
    assert present.tolist() == [[False, True, True]]  # min area 0: present even when empty
    assert int(masks[0, 0].sum()) == 10_000


def test_threshold_is_inclusive():
    masks, counts, _ = postprocess(torch.full((1, 1, 2, 2), 0.5), torch.tensor([0.5]), torch.tensor([1]))
    assert counts.item() == 4


def test_integer_downscale_is_a_box_filter_and_masks_need_half_coverage():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    assert resize(x, (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, 0, :2] = 1  # half of the top-left 2x2 block
    masks[0, 0, 2, 2] = 1  # a quarter of the bottom-right block
    assert downscale_masks(masks, (2, 2)).flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


def test_preprocess_scales_normalises_and_resizes():
    meta = ModelMetadata(input_height=4, input_width=8, train_height=2, train_width=4, mean=0.5, std=0.25)
    frames = torch.full((3, 4, 8), 255, dtype=torch.uint8)
    x = preprocess(frames, meta)
    assert x.shape == (3, 1, 2, 4)
    assert torch.allclose(x, torch.full_like(x, 2.0))  # (1.0 - 0.5) / 0.25


def test_inspection_model_averages_folds_and_returns_full_resolution_outputs():
    torch.manual_seed(0)
    cfg = UNetConfig(encoder="resnet18", encoder_depth=3, decoder_channels=(16, 8, 8))
    meta = ModelMetadata(input_height=64, input_width=320, train_height=32, train_width=160, folds=2)
    folds = [build_unet(cfg).eval(), build_unet(cfg).eval()]
    frames = torch.randint(0, 256, (2, 64, 320), dtype=torch.uint8)
    model = InspectionModel(folds, meta, with_probs=True).eval()
    with torch.no_grad():
        masks, counts, present, probs = model(frames)
        x = preprocess(frames, meta)
        expected = (torch.sigmoid(folds[0](x)) + torch.sigmoid(folds[1](x))) / 2
    assert masks.shape == (2, 4, 64, 320) and probs.shape == (2, 4, 64, 320)
    assert torch.allclose(probs, resize(expected, (64, 320)), atol=1e-6)
    assert torch.equal(counts, masks.to(torch.int64).sum(dim=(2, 3)).to(torch.int32))
    assert torch.equal(present, counts >= 200)


def test_cpu_encoder_exports_and_matches_onnx_runtime(tmp_path):
    """The MobileNetV3-small encoder (timm, through smp's tu- encoders) exports like the rest."""
    import numpy as np
    import onnxruntime as ort

    torch.manual_seed(0)
    cfg = UNetConfig(encoder="mobilenetv3_small_050", decoder_channels=(32, 24, 16, 8, 8))
    meta = ModelMetadata(input_height=64, input_width=320, train_height=32, train_width=160, encoder=cfg.encoder)
    model = InspectionModel([build_unet(cfg).eval()], meta, with_probs=True).eval()
    frames = torch.randint(0, 256, (2, 64, 320), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(frames)[3].numpy()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (frames,), str(path), input_names=["frames"],
                      output_names=["masks", "counts", "present", "probs"], dynamic_axes={"frames": {0: "N"}},
                      opset_version=17, dynamo=False)
    probs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probs"], {"frames": frames.numpy()})[0]
    # float32 reassociation between runtimes only: 1e-5 is two orders above what was seen (2e-7).
    assert np.abs(probs - expected).max() < 1e-5


def test_stages_beyond_the_encoder_depth_are_dropped_and_the_output_is_unchanged(tmp_path):
    """A ResNet-18 cut to 3 stages: smp builds layer3/layer4 (10.5 M parameters) and never runs them."""
    import segmentation_models_pytorch as smp

    from network.build import UnusedStage
    from network.checkpoint import FoldFacts, load_fold, save_fold_checkpoint

    torch.manual_seed(0)
    cfg = UNetConfig(encoder="resnet18", encoder_depth=3, decoder_channels=(16, 8, 8))
    unet = build_unet(cfg).eval()
    full = smp.Unet(encoder_name="resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=[16, 8, 8],
                    in_channels=1, classes=4, activation=None).eval()
    assert isinstance(unet.encoder.layer3, UnusedStage) and isinstance(unet.encoder.layer4, UnusedStage)
    assert not isinstance(unet.encoder.layer2, UnusedStage)
    dropped = sum(p.numel() for p in full.encoder.layer3.parameters()) + sum(
        p.numel() for p in full.encoder.layer4.parameters())
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in full.parameters()) - dropped
    # The same weights in both give the same output: nothing that runs was dropped.
    missing = full.load_state_dict(unet.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(("encoder.layer3.", "encoder.layer4.")) for k in missing)
    x = torch.rand(2, 1, 64, 320)
    with torch.no_grad():
        assert torch.equal(unet(x), full(x))

    # EfficientNet: blocks past the depth are dropped. smp 0.6 builds it with nn.SiLU, which exports as
    # it is (the memory-efficient swish of older releases needed switching off first).
    eff = build_unet(UNetConfig(encoder="efficientnet-b0", encoder_depth=3, decoder_channels=(16, 8, 8)))
    assert any(isinstance(b, UnusedStage) for b in eff.encoder._blocks)
    assert any(isinstance(m, torch.nn.SiLU) for m in eff.modules())
    assert not any("MemoryEfficient" in type(m).__name__ for m in eff.modules())

    # Checkpoints hold the used weights only and load back into the same network.
    path = tmp_path / "fold.pt"
    save_fold_checkpoint(path, cfg, unet, FoldFacts(fold=0, epoch=1, input_size=(64, 320), train_size=(64, 320),
                                                    class_names=("a", "b", "c", "d"), mean=0.0, std=1.0))
    assert path.stat().st_size < 1.5 * 4 * sum(p.numel() for p in unet.parameters())  # not the 11 M of the full encoder
    loaded, _, _ = load_fold(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), unet(x))
