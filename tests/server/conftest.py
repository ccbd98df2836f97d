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
    from toolchain.parity import synthetic_frames

    return synthetic_frames(50, *FRAME_SIZE, seed=11)


@pytest.fixture(scope="session")
def direct_backend(tiny_onnx: Path):
    """The tiny model loaded directly: the reference every server answer is compared with."""
    from engine.backends import load_backend

    backend = load_backend(tiny_onnx, device="cpu")
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
