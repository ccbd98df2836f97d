"""FPN folds and flip TTA in the one inspection graph: exported, parity-checked, recorded in metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from engine.metadata import read_onnx_metadata
from tests.fixtures import make_tiny_run
from toolchain.parity import synthetic_frames
from trainer.export import export_onnx
from trainer.rundir import load_run

FPN = {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 32, 8], "arch": "fpn"}


def _probs(model: Path, frames: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"frames": frames})[0]


def test_fpn_folds_export_into_the_inspection_graph_at_an_odd_frame_size(tmp_path: Path) -> None:
    """smp's FPN refuses inputs not divisible by its stride; 30x100 is padded to 32x104 and cropped back."""
    run = make_tiny_run(tmp_path / "run", folds=2, unet=FPN, input_size=(60, 200), train_size=(30, 100))
    model = tmp_path / "fpn.onnx"
    report = export_onnx(run, model, with_probs=True, drift_frames=0)  # raises beyond the fp32 tolerance
    assert report.parity[0].passed
    meta = read_onnx_metadata(str(model))
    assert (meta.arch, meta.input_size, meta.train_size) == ("fpn", (60, 200), (30, 100))
    frames = synthetic_frames(3, 60, 200, seed=2)
    probs = _probs(model, frames)
    assert probs.shape == (3, 4, 60, 200)
    # The eager FPN on the padded input, written out by hand: edge padding 30x100 -> 32x104, crop, mean.
    loaded = load_run(run)
    x = (torch.from_numpy(frames).float()[:, None] / 255 - loaded.metadata.mean) / loaded.metadata.std
    x = torch.nn.functional.avg_pool2d(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 1, 1), mode="replicate")
    with torch.no_grad():
        p = sum(torch.sigmoid(f(padded)[..., 1:31, 2:102]) for f in loaded.folds) / 2
    expected = torch.nn.functional.interpolate(p, size=(60, 200), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-4)  # fp32 kernels of two runtimes


def test_hflip_tta_in_the_graph_is_the_mean_over_the_frame_and_its_mirror(tiny_run: Path, tmp_path: Path) -> None:
    plain, tta = tmp_path / "plain.onnx", tmp_path / "hflip.onnx"
    export_onnx(tiny_run, plain, with_probs=True, drift_frames=0)
    export_onnx(tiny_run, tta, with_probs=True, drift_frames=0, tta="hflip")
    assert read_onnx_metadata(str(tta)).tta == "hflip" and read_onnx_metadata(str(plain)).tta == "none"
    frames = synthetic_frames(3, 64, 320, seed=9)
    mirrored = np.ascontiguousarray(frames[:, :, ::-1])
    # Eager reference from the plain graph: (p(x) + flip(p(flip(x)))) / 2. The in-graph resize back to
    # the frame commutes with the flip, so this is the same computation up to fp32 rounding.
    expected = (_probs(plain, frames) + _probs(plain, mirrored)[..., ::-1]) / 2
    got = _probs(tta, frames)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - _probs(plain, frames)).max() > 1e-3  # TTA does change the answer


def test_fit_trains_an_fpn_fold(synth_dir: Path, tmp_path: Path) -> None:
    from network.checkpoint import load_fold
    from trainer.config import FitOptions, FitSettings, resolve
    from trainer.fit import run_fit

    torch.set_num_threads(1)
    cfg = resolve(FitSettings(data=[str(synth_dir)], arch="fpn", encoder="resnet18", encoder_weights="none",
                            encoder_depth=3, decoder_channels=(32, 32, 8), folds=2, holdout=0.15, epochs=1,
                            batch_size=8))
    run_fit(cfg, FitOptions(out=str(tmp_path / "run"), fold=0, device="cpu", workers=0, progress=False))
    net, ucfg, _ = load_fold(tmp_path / "run" / "fold0" / "best.pt")
    assert ucfg.arch == "fpn" and type(net).__name__ == "FPN"


def test_fpn_masks_come_out_at_the_input_size_at_every_depth() -> None:
    from network.build import build_unet
    from network.config import UNetConfig

    for depth in (3, 4, 5):
        net = build_unet(UNetConfig(encoder="resnet18", encoder_depth=depth, decoder_channels=(32, 32, 8, 8, 8)[:depth],
                                    arch="fpn")).eval()
        with torch.no_grad():
            assert net(torch.rand(1, 1, 64, 96)).shape == (1, 4, 64, 96), depth
