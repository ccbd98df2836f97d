"""Shadow runs (server.shadow): the candidate on a share of live frames, its agreement with
production in GetModels and Prometheus, and frames skipped (counted) rather than queued."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from engine.backends.base import InspectionResult
from server.auth import AdminPolicy
from server.model_repo import STATE_FILE
from server.models_cli import call
from server.shadow import compare
from tests.server.conftest import scrape, wait_until
from tests.server.model_repos import repo_of, repo_server
from tests.server.test_models import inspect


def result(masks: np.ndarray, min_area: int = 2) -> InspectionResult:
    counts = masks.sum(axis=(2, 3)).astype(np.int32)
    return InspectionResult(masks=masks.astype(np.uint8), counts=counts, present=counts >= min_area)


def test_compare_measures_presence_dice_and_pixel_differences() -> None:
    production = np.zeros((2, 2, 4, 4), np.uint8)
    candidate = np.zeros_like(production)
    production[0, 0, :2, :2] = 1  # 4 pixels
    candidate[0, 0, :2, :1] = 1  # 2 of them: Dice 2 * 2 / (4 + 2)
    candidate[1, 1, 0, 0] = 1  # one pixel, below the minimum area: both say absent
    agreement = compare(result(production), result(candidate))
    assert agreement["agreed"].tolist() == [[True, True], [True, True]]
    assert agreement["either"].tolist() == [[True, False], [False, False]]
    assert agreement["dice"][0, 0] == pytest.approx(4 / 6) and agreement["dice"][1, 1] == 0.0
    assert agreement["dice"][0, 1] == 1.0, "two empty masks agree"
    assert agreement["difference"].tolist() == [[2, 0], [0, 1]]
    candidate[0, 0] = 0
    assert compare(result(production), result(candidate))["agreed"][0].tolist() == [False, True]


@pytest.fixture
def shadow_repo(tmp_path: Path, defect_onnx: Path, tiny_onnx: Path) -> Path:
    """Production "1" (the defect model), "2" a copy of it, "3" another model."""
    root = repo_of(tmp_path / "repo", {"1": defect_onnx, "2": defect_onnx, "3": tiny_onnx})
    (root / STATE_FILE).write_text(json.dumps({"production": "1", "candidate": None, "history": []}))
    return root


def test_shadow_runs_measure_the_candidate_against_production(shadow_repo: Path, camera_frames: np.ndarray) -> None:
    frames = camera_frames[:40]

    def settled(manager, n: int):
        return lambda: (s := manager.shadow.status()) is not None and s.frames + s.skipped == n

    async def main() -> None:
        async with repo_server(shadow_repo, shadow_share=1.0, metrics_port=0, policy=AdminPolicy()) as (server, manager):
            await manager.load("2", who="op")  # the same model: full agreement
            answers = await inspect(server, frames)
            assert {r.model_version for r in answers} == {"1"}, "shadow answers never reach cameras"
            await wait_until(settled(manager, len(frames)), what="every frame shadowed or skipped")
            status = await call(server.address, "status")
            assert status.candidate == "2" and status.shadow_share == 1.0 and status.shadow_frames > 0
            assert [(c.presence_agreement, c.dice, c.pixel_count_difference) for c in status.classes] == [(1, 1, 0)] * 4
            assert status.disagreeing_frames == 0 and status.candidate_latency_ms > 0
            await manager.load("3", who="op")  # another model: it disagrees
            await inspect(server, frames)
            await wait_until(settled(manager, len(frames)), what="every frame shadowed or skipped")
            status = await call(server.address, "status")
            assert status.candidate == "3"
            assert min(c.dice for c in status.classes) < 1 and max(c.pixel_count_difference for c in status.classes) > 0
            samples = scrape(server.metrics_port)
            frames_shadowed = samples[("inspection_shadow_frames_total", (("version", "3"),))]
            assert frames_shadowed == status.shadow_frames
            dice = {labels: v for (name, labels), v in samples.items() if name == "inspection_shadow_dice"}
            assert len(dice) == 4 and min(dice.values()) < 1
            off = await call(server.address, "shadow", "0")
            assert off.shadow_share == 0
            await inspect(server, frames[:5])
            assert manager.shadow.status().frames + manager.shadow.status().skipped == len(frames)
            await manager.promote("3", who="op")  # the shadowed candidate becomes production
            assert manager.shadow.status() is None and (await call(server.address, "status")).candidate == ""

    asyncio.run(main())
    actions = [json.loads(line)["action"] for line in (shadow_repo / "audit.jsonl").read_text().splitlines()]
    assert actions == ["load", "load", "shadow", "promote"]


def test_a_shadow_run_that_is_behind_skips_and_counts(shadow_repo: Path, camera_frames: np.ndarray) -> None:
    async def main() -> None:
        async with repo_server(shadow_repo, shadow_share=1.0) as (server, manager):
            await manager.load("3", who="op")
            runner = manager.shadow
            runner._run_lock.acquire()  # the shadow thread stalls on its first batch
            try:
                await inspect(server, camera_frames[:12])
                status = runner.status()
                assert status.skipped > 0 and status.frames == 0
            finally:
                runner._run_lock.release()
            await wait_until(lambda: runner.status().frames + runner.status().skipped == 12, what="the queue drained")

    asyncio.run(main())


def test_capture_policy_disagree_saves_the_candidates_disagreements(shadow_repo: Path, tmp_path: Path,
                                                                    camera_frames: np.ndarray) -> None:
    import csv

    from server.capture_policy import CapturePolicy
    from server.config import CaptureConfig

    assert str(CapturePolicy.parse("disagree,defects")) == "defects,disagree"
    capture = CaptureConfig(tmp_path / "captures", CapturePolicy.parse("disagree"))
    frames = camera_frames[:40]

    async def main() -> int:
        async with repo_server(shadow_repo, shadow_share=1.0, capture=capture) as (server, manager):
            await manager.load("3", who="op")
            await inspect(server, frames)
            await wait_until(lambda: manager.shadow.status().frames + manager.shadow.status().skipped == len(frames),
                             what="every frame shadowed or skipped")
            return manager.shadow.status().disagreeing_frames

    disagreeing = asyncio.run(main())
    assert disagreeing > 0, "the two models must disagree somewhere for the test to mean anything"
    with open(tmp_path / "captures" / "captures.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == disagreeing
    assert {row["ModelVersion"] for row in rows} == {"3"}
    assert all(row["Reason"].startswith("disagree:") and row["ImageId"].count("_shadow-3") == 1 for row in rows)


def test_the_console_shows_the_models_their_agreement_and_who_answered(shadow_repo: Path,
                                                                       camera_frames: np.ndarray) -> None:
    from server.console import Console, ConsoleConfig

    async def main() -> dict:
        async with repo_server(shadow_repo, shadow_share=1.0) as (server, manager):
            console = Console(server, ConsoleConfig(port=0, refresh_hz=10), models=manager)
            server.batch_listeners.append(console.observe)
            await manager.load("2", who="op")
            await inspect(server, camera_frames[:6], camera_id="cam-a")
            await manager.promote("2", who="op")
            await inspect(server, camera_frames[6:8], camera_id="cam-b")
            for _ in range(50):  # each state encodes a budget of images: the latest frames show once encoded
                state = await console.state()
                if all(camera["latest"] for camera in state["cameras"]):
                    break
                await asyncio.sleep(0.05)
            return state

    state = asyncio.run(main())
    models = state["models"]
    assert (models["production"], models["candidate"], models["rollback_to"]) == ("2", None, "1")
    assert [(e["action"], e["version"], e["outcome"]) for e in models["audit"]] == [("load", "2", "ok"),
                                                                                   ("promote", "2", "ok")]
    assert models["shadow"] is None, "the shadowed candidate became production"
    assert state["model"]["version"] == "2"
    latest = {camera["id"]: camera["latest"] for camera in state["cameras"]}
    assert (latest["cam-a"]["frame_id"], latest["cam-a"]["model_version"]) == (5, "1")
    assert (latest["cam-b"]["frame_id"], latest["cam-b"]["model_version"]) == (1, "2")


def test_a_busy_production_skips_the_shadow_frames_before_and_after_they_queue(tiny_onnx: Path,
                                                                                camera_frames: np.ndarray) -> None:
    from engine.backends import load_backend
    from server.batcher import FinishedBatch
    from server.shadow import ShadowRunner

    candidate = load_backend(tiny_onnx, device="cpu")
    frames = camera_frames[:4]
    batch = FinishedBatch(["cam0"] * 4, list(range(4)), frames, candidate.infer(frames), [[]] * 4)
    busy = [True]
    runner = ShadowRunner(1.0, busy=lambda: busy[0])
    runner.attach("c", candidate)
    runner.submit(batch)  # production has a full batch waiting: nothing queued
    assert (runner.status().frames, runner.status().skipped) == (0, 4)
    busy[0] = False
    runner._run_lock.acquire()  # queued while production was idle ...
    runner.submit(batch)
    busy[0] = True  # ... production got busy before the shadow thread ran it: skipped there
    runner._run_lock.release()
    runner.close()
    assert (runner.status().frames, runner.status().skipped) == (0, 8)
    busy[0] = False
    runner = ShadowRunner(1.0, busy=lambda: busy[0])
    runner.attach("c", candidate)
    runner.submit(batch)
    runner.close()
    assert (runner.status().frames, runner.status().skipped) == (4, 0)
