"""Server test fixtures: the tiny exported model (``tiny_onnx``), camera frames, a running server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

FRAME_SIZE = (64, 320)  # the tiny model's input (height, width)
DRIFT_BINS = 5  # fewer bins than the default 10: steadier PSI on the tests' 200-frame windows


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """A Prometheus text exposition as ``{(sample name, sorted labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The samples of a running server's ``/metrics`` on 127.0.0.1:``port``."""
    import urllib.request

    return metric_samples(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A one-day certificate and key for 127.0.0.1/localhost (skips the test without openssl)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="session")
def camera_frames() -> np.ndarray:
    """50 strip-like uint8 frames [50, 64, 320] at the tiny model's input size."""
    from engine.parity import synthetic_frames

    return synthetic_frames(50, *FRAME_SIZE, seed=11)


# --------------------------------------------------------------------------- a model that finds defects
# The random tiny U-Nets' defects depend on quantile thresholds of their near-0.5 outputs. The
# server's "same answer" checks run on a model whose defects are known pixels instead: a tiny U-Net
# whose weights pass the standardised frame straight through (one channel of each stage; every
# other weight zero) and whose head makes class 1 of bright pixels (scratches), class 2 of dark
# ones (pits), class 3 of the brightest (its minimum area too large: pixels, never present) and
# class 4 of none. ``engine.parity.synthetic_frames`` draws such scratches and pits.

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

    from engine.model import UNetConfig, build_unet
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

    from engine.checkpoint import FoldFacts
    from engine.metadata import DEFAULT_CLASS_NAMES
    from engine.model import UNetConfig, save_fold_checkpoint
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


@pytest.fixture(scope="session")
def direct_backend(defect_onnx: Path):
    """The defect model loaded directly: the reference every server answer is compared with."""
    from engine.backends import load_backend

    backend = load_backend(defect_onnx, device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def direct_output(direct_backend, camera_frames: np.ndarray) -> dict[str, list]:
    """The backend's own answer for every camera frame: counts, present and RLE per class."""
    result = direct_backend.infer(camera_frames)
    return {"counts": result.counts.tolist(), "present": result.present.tolist(), "rles": result.rle()}


def line_frames(n: int, seed: int, brightness: int = 0) -> np.ndarray:
    """``n`` frames of the synthetic line as its camera sends them: ``trainer synth`` frames (the training
    data's generator and JPEG compression) decoded to uint8 at the tiny model's input size,
    ``brightness`` grey levels brighter (a lamp change, clipped at 255)."""
    import tempfile

    from trainer.data import DataConfig, load_samples, read_image
    from trainer.synth import synthesize

    cfg = DataConfig(num_classes=4, height=FRAME_SIZE[0], width=FRAME_SIZE[1])
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthesize(Path(tmp) / "line", n, *FRAME_SIZE, seed=seed)
        frames = np.stack([read_image(s.path, cfg) for s in load_samples(folder, cfg)])
    return np.clip(frames.astype(np.int16) + brightness, 0, 255).astype(np.uint8)


def with_drift_reference(model: Path, reference: dict | None, out: Path) -> Path:
    """A copy of an exported ONNX model whose ``inspection.drift_reference`` prop is replaced by
    ``reference`` (None, or a malformed one: what a model without a usable reference looks like)."""
    import json

    import onnx

    from engine.metadata import PREFIX

    proto = onnx.load(str(model))
    props = {p.key: p.value for p in proto.metadata_props}
    assert PREFIX + "drift_reference" in props, "the export writes every metadata field"
    props[PREFIX + "drift_reference"] = json.dumps(reference)
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out))
    return out


@pytest.fixture(scope="session")
def drift_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_data_run: Path) -> Path:
    """Fold 0 of ``tiny_data_run`` as ``trainer export --folds 0 --drift-bins 5`` writes it, with its drift
    reference: 256 of the run's training frames, areas predicted out of fold.

    One fold, so the out-of-fold predictor is the served model itself: the reference's areas are
    what the server sees on unshifted frames. (The mean of two random U-Nets predicts far smaller
    areas than either alone; trained folds agree much more, but not exactly.)
    """
    import torch

    from trainer.export import export_onnx

    torch.set_num_threads(1)  # the machine's cores are shared: more threads only wait on each other
    out = tmp_path_factory.mktemp("drift_onnx") / "model.onnx"
    report = export_onnx(tiny_data_run, out, folds="0", drift_frames=256, drift_bins=DRIFT_BINS)
    assert report.drift.frames == 256
    return out


@pytest.fixture(scope="session")
def drift_reference(drift_onnx: Path):
    """The drift reference ``drift_onnx`` carries, as read back from its metadata."""
    from engine.drift import DriftReference
    from engine.metadata import read_onnx_metadata

    return DriftReference.from_dict(read_onnx_metadata(str(drift_onnx)).drift_reference)


@pytest.fixture(scope="session")
def drift_backend(drift_onnx: Path):
    """``drift_onnx`` loaded directly: the counts the server's drift statistics are compared with."""
    from engine.backends import load_backend

    backend = load_backend(drift_onnx, device="cpu")
    yield backend
    backend.close()


@contextlib.asynccontextmanager
async def running_server(model: Path, **config) -> AsyncIterator:
    """An ``InspectionServer`` on 127.0.0.1, a free port, loading ``model`` through ``load_backend``."""
    from engine.backends import load_backend
    from server.service import InspectionServer, ServerConfig

    options = {"port": 0, "metrics_port": None, "max_delay_ms": 2.0, **config}
    server = InspectionServer(lambda: load_backend(model, device="cpu"), ServerConfig(**options))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=10)


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Polls ``predicate()`` until it holds (state changes that happen on the server's own tasks)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class ServerThread:
    """A running server on its own event loop in a background thread, for tests that drive a
    blocking client (the ``server client`` CLI in-process) from the test's thread."""

    def __init__(self, model: Path, **config) -> None:
        self.model = model
        self.config = config
        self.server = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="test-server", daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with running_server(self.model, **self.config) as server:
                self.server = server
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            self._failure = exc
            self._ready.set()

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(timeout=60), "the test server did not start"
        if self._failure is not None:
            raise self._failure
        return self.server

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)
