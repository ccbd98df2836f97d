"""Hot swap (server.models): promote, roll back, refuse what does not fit, and keep serving throughout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.model_repo import STATE_FILE, Roles
from server.models import ModelChangeRefused
from tests.server.model_repos import repo_of, repo_server, with_class_names
from tests.server.test_service import make_request, stub_for


async def inspect(server, frames: np.ndarray, camera_id: str = "cam0") -> list:
    """Every frame through ``InspectOne``; the answers."""
    channel, stub = stub_for(server)
    async with channel:
        return [await stub.InspectOne(make_request(camera_id, i, f, "gray8")) for i, f in enumerate(frames)]


def counts_of(responses) -> list[list[int]]:
    assert not any(r.HasField("error") for r in responses), [r.error.message for r in responses]
    return [[d.pixel_count for d in r.defects] for r in responses]


async def health(server) -> int:
    channel = stub_for(server)[0]
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return reply.status


def test_promote_and_rollback_swap_the_model_that_answers(tmp_path: Path, defect_onnx: Path, tiny_onnx: Path,
                                                          camera_frames: np.ndarray) -> None:
    from engine.backends import load_backend

    frames = camera_frames[:8]
    expected = {}
    for version, model in (("1", defect_onnx), ("2", tiny_onnx)):
        with load_backend(model, device="cpu") as backend:
            expected[version] = backend.infer(frames).counts.tolist()
    assert expected["1"] != expected["2"], "the two versions must answer differently for the test to mean anything"
    root = repo_of(tmp_path / "repo", {"1": defect_onnx, "2": tiny_onnx})
    (root / STATE_FILE).write_text(json.dumps({"production": "1", "candidate": None, "history": []}))

    async def main() -> None:
        async with repo_server(root, max_batch=4) as (server, manager):
            first = await inspect(server, frames)
            assert {r.model_version for r in first} == {"1"} and counts_of(first) == expected["1"]
            loaded = await manager.load("2", who="CN=admin")
            assert manager.candidate is loaded and manager.repository.roles == Roles("1", "2", ())
            assert {r.model_version for r in await inspect(server, frames)} == {"1"}, "a candidate does not answer"
            old_backend = server.backend
            assert await manager.promote(None, who="CN=admin") == "2"
            second = await inspect(server, frames)
            assert {r.model_version for r in second} == {"2"} and counts_of(second) == expected["2"]
            assert server.info.model_version == "2" and server.backend is loaded.backend
            assert old_backend is not server.backend
            assert await manager.rollback(who="token") == "1"
            third = await inspect(server, frames)
            assert {r.model_version for r in third} == {"1"} and counts_of(third) == expected["1"]
            assert await health(server) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(ModelChangeRefused, match="no previous production"):
                await manager.rollback(who="token")

    asyncio.run(main())
    assert json.loads((root / STATE_FILE).read_text()) == {"production": "1", "candidate": None, "history": []}
    audit = [(e["action"], e["version"], e["who"], e["outcome"])
             for e in map(json.loads, (root / "audit.jsonl").read_text().splitlines())]
    assert audit == [("load", "2", "CN=admin", "ok"), ("promote", "2", "CN=admin", "ok"), ("rollback", "1", "token", "ok"),
                     ("rollback", "", "token", "refused")]


def test_a_failed_load_leaves_production_serving(tmp_path: Path, defect_onnx: Path, camera_frames: np.ndarray) -> None:
    renamed = with_class_names(defect_onnx, ["a", "b", "c", "d"], tmp_path / "renamed.onnx")
    root = repo_of(tmp_path / "repo", {"1": defect_onnx, "2": b"not an onnx model", "3": renamed})
    (root / STATE_FILE).write_text(json.dumps({"production": "1", "candidate": None, "history": []}))

    async def main() -> None:
        async with repo_server(root) as (server, manager):
            with pytest.raises(ModelChangeRefused, match="loading version '2' .*failed"):
                await manager.promote("2", who="op")
            with pytest.raises(ModelChangeRefused, match="classes .* differ .*--allow-class-change"):
                await manager.load("3", who="op")
            with pytest.raises(ModelChangeRefused, match="no version folder|holds no model file"):
                await manager.promote("9", who="op")
            with pytest.raises(ModelChangeRefused, match="production already"):
                await manager.promote("1", who="op")
            assert manager.candidate is None and manager.repository.roles == Roles("1")
            assert {r.model_version for r in await inspect(server, camera_frames[:4])} == {"1"}
            assert await health(server) == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(main())
    outcomes = [(e["action"], e["version"], e["outcome"])
                for e in map(json.loads, (root / "audit.jsonl").read_text().splitlines())]
    assert outcomes == [("promote", "2", "failed"), ("load", "3", "refused"), ("promote", "9", "refused"),
                        ("promote", "1", "refused")]


def test_allow_class_change_lets_other_classes_in(tmp_path: Path, defect_onnx: Path,
                                                  camera_frames: np.ndarray) -> None:
    renamed = with_class_names(defect_onnx, ["a", "b", "c", "d"], tmp_path / "renamed.onnx")
    root = repo_of(tmp_path / "repo", {"1": defect_onnx, "2": renamed})
    (root / STATE_FILE).write_text(json.dumps({"production": "1", "candidate": None, "history": []}))

    async def main() -> None:
        async with repo_server(root, allow_class_change=True) as (server, manager):
            await manager.promote("2", who="op")
            assert [c.name for c in server.info.classes] == ["a", "b", "c", "d"]
            assert {r.model_version for r in await inspect(server, camera_frames[:2])} == {"2"}

    asyncio.run(main())


def test_a_restarted_server_keeps_its_roles_and_reloads_its_candidate(tmp_path: Path, defect_onnx: Path) -> None:
    root = repo_of(tmp_path / "repo", {"1": defect_onnx, "2": defect_onnx, "3": b"corrupt"})
    (root / STATE_FILE).write_text(json.dumps({"production": "2", "candidate": "1", "history": ["1"]}))

    async def main(expect_candidate: str | None) -> None:
        async with repo_server(root) as (server, manager):
            assert server.info.model_version == "2"
            await manager.restore_candidate()
            assert (manager.candidate.version if manager.candidate else None) == expect_candidate

    asyncio.run(main("1"))
    (root / STATE_FILE).write_text(json.dumps({"production": "2", "candidate": "3", "history": []}))
    asyncio.run(main(None))  # a candidate that no longer loads: production serves without one
    audit = [(e["action"], e["version"], e["who"], e["outcome"])
             for e in map(json.loads, (root / "audit.jsonl").read_text().splitlines())]
    assert audit == [("load", "1", "server (restart)", "ok"), ("load", "3", "server (restart)", "failed")]
