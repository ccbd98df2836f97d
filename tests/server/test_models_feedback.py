"""The line feedback follows the hot-swapped model (server.feedback with server.models): drift scores
against the reference of the model that ran each batch, captures named by and chosen with it."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path

import numpy as np

from engine.drift import build_reference
from protos.inspection.v1 import inspection_pb2 as pb
from server.capture_policy import CapturePolicy
from server.config import CaptureConfig
from server.model_repo import STATE_FILE
from tests.server.conftest import scrape, wait_until, with_drift_reference
from tests.server.model_repos import repo_of, repo_server
from tests.server.test_models import inspect
from tests.server.test_service import stub_for

BINS = 5


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def brighter(frames: np.ndarray, levels: int) -> np.ndarray:
    return np.clip(frames.astype(np.int16) + levels, 0, 255).astype(np.uint8)


def test_after_a_swap_drift_and_capture_follow_the_new_model(tmp_path: Path, defect_onnx: Path,
                                                              camera_frames: np.ndarray) -> None:
    frames = camera_frames  # 50 frames: one full drift window per phase
    # Version 1's reference is these very frames (no drift); version 2's was taken under a far
    # brighter lamp, so the same frames drift against it: only a switch of reference shows that.
    own = build_reference(frames, bins=BINS).to_dict()
    bright = build_reference(brighter(frames, 90), bins=BINS).to_dict()
    root = repo_of(tmp_path / "repo", {
        "1": with_drift_reference(defect_onnx, own, tmp_path / "own.onnx"),
        "2": with_drift_reference(defect_onnx, bright, tmp_path / "bright.onnx"),
    })
    (root / STATE_FILE).write_text(json.dumps({"production": "1", "candidate": None, "history": []}))
    captures = tmp_path / "captures"
    capture = CaptureConfig(captures, CapturePolicy.parse("sample:1.0"))
    n = len(frames)

    async def line_status(server) -> pb.LineStatus:
        channel, stub = stub_for(server)
        async with channel:
            return await stub.GetLineStatus(pb.GetLineStatusRequest())

    async def main() -> tuple[pb.LineStatus, pb.LineStatus, pb.ModelInfo, dict]:
        async with repo_server(root, max_batch=4, drift_window=n, drift_min_frames=n, metrics_port=0,
                               capture=capture) as (server, manager):
            await inspect(server, frames)
            await wait_until(lambda: server.line_status().cameras[0].frames_seen == n, what="version 1's batches")
            before = await line_status(server)
            await manager.promote("2", who="op")
            await inspect(server, frames)
            await wait_until(lambda: server.line_status().model_version == "2"
                             and server.line_status().cameras[0].frames_seen == n, what="version 2's batches")
            after = await line_status(server)
            channel, stub = stub_for(server)
            async with channel:
                info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            return before, after, info, await asyncio.to_thread(scrape, server.metrics_port)

    before, after, info, metrics = asyncio.run(main())
    assert before.model_version == "1" and before.drift_state == "on"
    assert before.cameras[0].scored and not before.cameras[0].over_threshold
    # The windows restarted for version 2 (n frames, not 2n) and are scored against its reference.
    assert after.model_version == "2" and after.drift_state == "on"
    camera = after.cameras[0]
    assert (camera.frames_seen, camera.window_fill, camera.scored) == (n, n, True)
    assert camera.over_threshold, "the frames drift against version 2's brighter reference"
    assert info.model_version == "2"
    assert metrics[("inspection_drift_model", (("model_version", "2"),))] == 1.0
    assert not any(name == "inspection_drift_model" and labels != (("model_version", "2"),)
                   for name, labels in metrics)
    rows = read_rows(captures / "captures.csv")
    assert [r["ModelVersion"] for r in rows] == ["1"] * n + ["2"] * n


def test_a_batch_of_a_new_version_switches_drift_on_and_capture_to_its_minimum_areas(
        tmp_path: Path, direct_backend, camera_frames: np.ndarray) -> None:
    from engine.metadata import ModelMetadata
    from server.batcher import FinishedBatch
    from server.feedback import NO_REFERENCE, LineFeedback

    frames = camera_frames[:8]
    result = direct_backend.infer(frames)
    largest = result.counts.max(axis=0)
    assert largest.any(), "the frames must have defect pixels for the uncertain rule to mean anything"
    base = direct_backend.metadata.to_dict()
    # Version 1: no reference, minimum areas far above every count (nothing near them: nothing uncertain).
    first = ModelMetadata.from_dict({**base, "drift_reference": None, "min_areas": [int(10 * largest.max() + 10)] * 4})
    # Version 2: a reference, and minimum areas at the largest counts (those frames are uncertain).
    second = ModelMetadata.from_dict({**base, "drift_reference": build_reference(camera_frames, bins=BINS).to_dict(),
                                      "min_areas": [int(c) for c in largest]})
    feedback = LineFeedback(first, drift_window=8, drift_min_frames=8, psi_threshold=0.25, ks_threshold=0.2,
                            model_version="1",
                            capture=CaptureConfig(tmp_path / "captures", CapturePolicy.parse("uncertain")))
    assert feedback.status().drift_state == NO_REFERENCE

    def batch(version: str, metadata: ModelMetadata) -> FinishedBatch:
        sources = [pb.InspectRequest(camera_id="cam", frame_id=i) for i in range(len(frames))]
        for s, frame in zip(sources, frames):
            s.raw_image.CopyFrom(pb.RawImage(width=frame.shape[1], height=frame.shape[0], channels=1,
                                             data=frame.tobytes()))
        return FinishedBatch(["cam"] * len(frames), sources, frames, result, result.rle(), version, metadata)

    feedback.submit(batch("1", first))
    feedback.submit(batch("2", second))
    feedback.close()
    status = feedback.status()
    assert (status.model_version, status.drift_state) == ("2", "on")
    assert status.cameras[0].frames_seen == len(frames)
    rows = read_rows(tmp_path / "captures" / "captures.csv")
    expected = sum(any(c > 0 and 0.5 * a <= c <= 2 * a for c, a in zip(counts, largest)) for counts in result.counts)
    assert expected >= 1 and len(rows) == expected
    assert {r["ModelVersion"] for r in rows} == {"2"}
    assert all(r["Reason"].startswith("uncertain:") for r in rows)


def test_without_drift_or_capture_a_swap_to_a_model_with_a_reference_turns_drift_on(
        direct_backend, camera_frames: np.ndarray) -> None:
    from engine.metadata import ModelMetadata
    from server.batcher import FinishedBatch
    from server.feedback import LineFeedback

    frames = camera_frames[:4]
    result = direct_backend.infer(frames)
    base = direct_backend.metadata.to_dict()
    plain = ModelMetadata.from_dict({**base, "drift_reference": None})
    referenced = ModelMetadata.from_dict({**base, "drift_reference": build_reference(camera_frames, bins=BINS).to_dict()})
    feedback = LineFeedback(plain, drift_window=8, drift_min_frames=4, psi_threshold=0.25, ks_threshold=0.2,
                            model_version="1")
    assert not feedback.active
    feedback.submit(FinishedBatch(["cam"] * 4, [None] * 4, frames, result, result.rle(), "1", plain))
    feedback.submit(FinishedBatch(["cam"] * 4, [None] * 4, frames, result, result.rle(), "2", referenced))
    feedback.close()
    status = feedback.status()
    assert (status.model_version, status.drift_enabled) == ("2", True)
    assert status.cameras[0].frames_seen == 4
