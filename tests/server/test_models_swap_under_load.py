"""The hot swap's promise under load: 16 cameras x 300 frames through the camera library while the
production model is swapped twice, a corrupt version is refused, and production is rolled back once.

Every frame is answered exactly once, in order, without an error; each answer equals the direct
output of the version it names (so the name is the model that really ran the frame); per stream the
versions follow the order of the swaps and never go back between them; a frame sent after a swap
returned is run by the new production or a later one, and a frame answered before a swap began by
an earlier one. The model is a one-fold random U-Net at 32x64 pixels, so the run takes seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client.camera import CameraStream, open_channel
from server.model_repo import STATE_FILE
from server.models import ModelChangeRefused
from tests.server.model_repos import repo_of, repo_server
from tests.server.test_service import make_request

CAMERAS, FRAMES, POOL = 16, 300, 24
SMALL = (32, 64)  # frame height, width: the smallest the tiny U-Net (3 stride-2 stages) takes


@pytest.fixture(scope="module")
def small_versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three one-fold random U-Nets (seeds 0, 1, 2) exported as versions "1", "2", "3"."""
    import torch

    from tests.fixtures import make_tiny_run
    from trainer.export import export_onnx

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("small_versions")
    models = {}
    for seed, version in enumerate(("1", "2", "3")):
        run = make_tiny_run(folder / f"run{version}", folds=1, input_size=SMALL, train_size=SMALL, seed=seed)
        models[version] = export_onnx(run, folder / f"model{version}.onnx", drift_frames=0).out_path
    return models


@dataclass
class Swap:
    """One swap the test asked for: what, and when it began and returned (``time.perf_counter()``)."""

    action: str
    version: str
    began: float = 0.0
    returned: float = 0.0
    refused: str = ""


@dataclass
class Log:
    sent: dict[str, list[float]] = field(default_factory=dict)  # camera -> send time per frame
    answers: dict[str, list] = field(default_factory=dict)  # camera -> (frame id, response, time)


async def camera(channel, camera_id: str, requests: list, log: Log) -> None:
    sent, answers = log.sent.setdefault(camera_id, []), log.answers.setdefault(camera_id, [])
    async with CameraStream(channel, camera_id, seed=0) as stream:
        async def produce() -> None:
            for request in requests:
                await stream.send(request)
                sent.append(time.perf_counter())
            await stream.close()

        producer = asyncio.create_task(produce())
        async for answer in stream.answers():
            answers.append((answer.frame_id, answer.response, time.perf_counter(), answer.error_message))
        await producer


async def swap_while_streaming(manager, plan: list[Swap], log: Log) -> None:
    """Runs ``plan`` one step per 900 answers (of 4800)."""
    for k, swap in enumerate(plan, 1):
        while sum(len(a) for a in log.answers.values()) < 900 * k:
            await asyncio.sleep(0.005)
        swap.began = time.perf_counter()
        try:
            if swap.action == "rollback":
                await manager.rollback(who="test")
            else:
                await manager.promote(swap.version, who="test")
        except ModelChangeRefused as exc:
            swap.refused = str(exc)
        swap.returned = time.perf_counter()


def is_in_order(runs: list[str], order: list[str]) -> bool:
    """Whether ``runs`` is a subsequence of ``order`` (a stream may miss a short-lived production)."""
    remaining = iter(order)
    return all(any(version == step for step in remaining) for version in runs)


def test_swaps_under_load_answer_every_frame_once_by_the_model_that_ran_it(
        tmp_path: Path, small_versions: dict[str, Path]) -> None:
    from engine.backends import load_backend
    from toolchain.parity import synthetic_frames

    pool = synthetic_frames(POOL, *SMALL, seed=3)
    expected = {}
    for version, model in small_versions.items():
        with load_backend(model, device="cpu") as backend:
            expected[version] = backend.infer(pool).counts.tolist()
    assert len({json.dumps(counts) for counts in expected.values()}) == 3, "the versions must answer differently"
    root = repo_of(tmp_path / "repo", {**small_versions, "9": b"a corrupt model file"})
    (root / STATE_FILE).write_text(json.dumps({"production": "1", "candidate": None, "history": []}))
    plan = [Swap("promote", "2"), Swap("promote", "9"), Swap("promote", "3"), Swap("rollback", "2")]
    log = Log()

    async def main() -> None:
        async with repo_server(root, max_batch=16) as (server, manager), open_channel(server.address) as channel:
            requests = {f"cam{c:02d}": [make_request("", i, pool[(i + c) % POOL], "gray8") for i in range(FRAMES)]
                        for c in range(CAMERAS)}
            swapping = asyncio.create_task(swap_while_streaming(manager, plan, log))
            await asyncio.gather(*(camera(channel, cid, reqs, log) for cid, reqs in requests.items()))
            await swapping
            assert server.stats()["inflight"] == 0 and manager.production_version == "2"

    asyncio.run(main())
    assert [bool(s.refused) for s in plan] == [False, True, False, False]
    assert "loading version '9' (model.onnx) failed" in plan[1].refused
    check_answers(log, plan, expected)


def check_answers(log: Log, plan: list[Swap], expected: dict[str, list]) -> None:
    done = [s for s in plan if not s.refused]
    order = ["1", *(s.version for s in done)]
    assert sorted(log.answers) == [f"cam{c:02d}" for c in range(CAMERAS)]
    seen = set()
    for c, (camera_id, answers) in enumerate(sorted(log.answers.items())):
        assert [a[0] for a in answers] == list(range(FRAMES)), f"{camera_id}: every frame once, in order"
        assert [a[3] for a in answers if a[3]] == [], f"{camera_id}: no errors"
        versions = [a[1].model_version for a in answers]
        for (frame_id, response, answered, _), version in zip(answers, versions):
            counts = [d.pixel_count for d in response.defects]
            assert counts == expected[version][(frame_id + c) % POOL], f"{camera_id} frame {frame_id}: not {version}'s answer"
            sent = log.sent[camera_id][frame_id]
            for k, swap in enumerate(done, 1):
                if sent > swap.returned:
                    assert version in order[k:], f"{camera_id} frame {frame_id} sent after swap {k} ran on {version}"
                if answered < swap.began:
                    assert version in order[:k], f"{camera_id} frame {frame_id} answered before swap {k} by {version}"
        runs = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
        assert is_in_order(runs, order), f"{camera_id}: versions {runs} against the swaps {order}"
        seen.update(versions)
    assert seen == {"1", "2", "3"}, "every production served frames"
