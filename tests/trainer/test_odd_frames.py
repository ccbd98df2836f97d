"""Frames whose sides are not multiples of the network's stride (200x200, as NEU-DET's) train, export,
serve and stream: padded to the stride in training and in the graph, cropped back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from network.processing import padded_logits
from trainer.config import FitOptions, FitSettings, resolve
from trainer.fit import run_fit


def test_padded_logits_crops_back_and_equals_the_network_on_a_stride_multiple() -> None:
    from network.build import build_unet
    from network.config import UNetConfig
    from network.processing import network_stride

    torch.manual_seed(0)
    net = build_unet(UNetConfig(encoder="resnet18", encoder_depth=3, decoder_channels=(8, 8, 4))).eval()
    assert network_stride(net) == 8
    x = torch.rand(2, 1, 100, 100)
    with torch.no_grad():
        out = padded_logits(net, x, (100, 100), 8)
        # 100 -> 104: 2 edge pixels on each side, cropped back after the network.
        padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
        torch.testing.assert_close(out, net(padded)[..., 2:102, 2:102], rtol=0, atol=0)
        # On a multiple of the stride nothing is padded: the network's own output.
        y = x[..., :96, :96].contiguous()
        torch.testing.assert_close(padded_logits(net, y, (96, 96), 8), net(y), rtol=0, atol=0)


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fold, one epoch of a tiny U-Net on 200x200 synthetic frames, trained at 100x100 (stride 8)."""
    from trainer.synth import synthesize

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("odd")
    data = synthesize(root / "data", 24, 200, 200, seed=3)
    cfg = resolve(FitSettings(data=[str(data)], encoder="resnet18", encoder_weights="none", encoder_depth=3,
                            decoder_channels=(8, 8, 4), scale=0.5, folds=2, holdout=0.15, epochs=1, batch_size=8))
    assert cfg.train_size == (100, 100) and 100 % 8
    run_fit(cfg, FitOptions(out=str(root / "run"), fold=0, device="cpu", workers=0, progress=False))
    return root / "run"


def test_200x200_frames_fit_export_serve_and_stream(odd_run: Path, tmp_path: Path) -> None:
    import grpc

    from engine.backends import load_backend
    from protos.inspection.v1 import inspection_pb2 as pb
    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
    from tests.server.conftest import running_server
    from toolchain.parity import synthetic_frames
    from trainer.export import export_onnx

    frames = synthetic_frames(5, 200, 200, seed=4)
    _postprocess_with_masks(odd_run, frames)
    model = tmp_path / "model.onnx"
    report = export_onnx(odd_run, model, drift_frames=0)  # parity-checked against torch eager
    assert report.metadata.input_size == (200, 200) and report.metadata.train_size == (100, 100)
    with load_backend(model, device="cpu", threads=1) as backend:
        direct = backend.infer(frames)
    assert direct.masks.shape == (5, 4, 200, 200)
    direct_rles = direct.rle()

    async def stream() -> list:
        async with running_server(model, max_batch=4) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.InspectionServiceStub(channel)

                async def requests():
                    for i, frame in enumerate(frames):
                        raw = pb.RawImage(width=200, height=200, channels=1, data=frame.tobytes())
                        yield pb.InspectRequest(camera_id="cam", frame_id=i, raw_image=raw)

                return [r async for r in stub.Inspect(requests())]

    answers = asyncio.run(stream())
    assert [a.frame_id for a in answers] == list(range(5))
    from engine import rle

    for i, answer in enumerate(answers):
        assert not answer.HasField("error"), answer.error.message
        assert [d.pixel_count for d in answer.defects] == direct.counts[i].tolist()
        assert [d.rle for d in answer.defects] == direct_rles[i]
        for k, d in enumerate(answer.defects):  # each mask is the frame's size, 200x200
            np.testing.assert_array_equal(rle.decode(d.rle, 200, 200), direct.masks[i, k])
    assert direct.present.any() and direct.counts.sum() > 0  # non-empty masks: the size is exercised


def _postprocess_with_masks(run: Path, frames: np.ndarray) -> None:
    """Thresholds at each class's 90th percentile of the one-epoch model's probabilities (the thesis'
    0.5 would leave every mask empty), minimum area 1: every class has pixels in the answers."""
    import json

    from network.inspection import InspectionModel
    from trainer.rundir import load_run

    loaded = load_run(run)
    with torch.no_grad():
        probs = InspectionModel(loaded.folds, loaded.metadata).probabilities(torch.from_numpy(frames)).numpy()
    thresholds = [round(float(np.quantile(probs[:, k], 0.9)), 6) for k in range(probs.shape[1])]
    (run / "postprocess.json").write_text(json.dumps({"thresholds": thresholds, "min_areas": [1] * 4}))
