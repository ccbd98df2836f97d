"""Server test fixtures: the tiny exported model (``tiny_onnx``), camera frames, a running server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

FRAME_SIZE = (64, 320)  # the tiny model's input (height, width)


@pytest.fixture(scope="session")
def camera_frames() -> np.ndarray:
    """50 strip-like uint8 frames [50, 64, 320] at the tiny model's input size."""
    from engine.parity import synthetic_frames

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
