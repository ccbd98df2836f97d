"""``server serve`` and ``server client`` as real processes."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from tests.server.conftest import running_server
from tests.server.test_service import assert_equals_direct, make_request

REPO = Path(__file__).resolve().parents[2]


async def start_serve(model: Path, *flags: str) -> tuple[asyncio.subprocess.Process, str, list[str]]:
    """Starts ``server serve`` on a free port; returns the process, its address and its log (kept filling)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--port", "0", "--metrics-port", "-1",
        "--device", "cpu", *flags, cwd=REPO, stderr=asyncio.subprocess.PIPE,
    )
    log: list[str] = []
    address = None
    async with asyncio.timeout(60):
        while True:
            line = (await process.stderr.readline()).decode()
            if not line:
                raise AssertionError("server serve exited before it was ready:\n" + "".join(log))
            log.append(line)
            if match := re.search(r"event=start address=(\S+)", line):
                address = match.group(1)
            if "event=ready" in line:
                break

    async def drain() -> None:  # keep reading so the server never blocks on a full pipe
        async for raw in process.stderr:
            log.append(raw.decode())

    asyncio.get_running_loop().create_task(drain())
    assert address is not None
    return process, address, log


def test_sigterm_during_streaming_answers_every_accepted_frame(tiny_onnx, camera_frames, direct_output):
    async def main():
        process, address, log = await start_serve(tiny_onnx, "--max-batch", "4", "--max-stream-inflight", "8")
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.InspectionServiceStub(channel)
                answers: dict[str, list] = {"cam0": [], "cam1": []}
                enough = asyncio.Event()

                async def camera(camera_id: str) -> grpc.StatusCode:
                    async def endless():
                        for i in range(100_000):
                            yield make_request(camera_id, i, camera_frames[i % 50], "gray8")

                    try:
                        async for response in stub.Inspect(endless()):
                            answers[camera_id].append(response)
                            if all(len(a) >= 5 for a in answers.values()):
                                enough.set()
                    except grpc.aio.AioRpcError as exc:
                        return exc.code(), exc.details()
                    return grpc.StatusCode.OK, ""

                streams = asyncio.gather(camera("cam0"), camera("cam1"))
                await enough.wait()
                process.send_signal(signal.SIGTERM)
                endings = await streams
            async with asyncio.timeout(60):
                returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await asyncio.sleep(0.1)  # the log reader takes the last lines
        return answers, endings, returncode, "".join(log)

    answers, endings, returncode, log = asyncio.run(main())
    assert returncode == 0, log
    for code, details in endings:
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details, (code, details)
    for responses in answers.values():
        # A prefix of the stream, each frame answered once, in order, correctly.
        assert [r.frame_id for r in responses] == list(range(len(responses)))
        for r in responses:
            assert_equals_direct(r, direct_output, r.frame_id % 50)
    stop = re.search(r"event=stop accepted=(\d+) answered=(\d+) abandoned=(\d+)", log)
    assert stop, log
    accepted, answered, abandoned = map(int, stop.groups())
    received = sum(len(r) for r in answers.values())
    assert accepted == answered == received and abandoned == 0, (accepted, answered, received)
    assert "event=signal action=drain" in log
    # The cameras never stop sending, so each stream has its 8 slots (nearly) full at SIGTERM: the
    # drain really answered frames that were in flight, not an idle server.
    inflight_at_signal = int(re.search(r"event=stopping open_streams=2 inflight=(\d+)", log).group(1))
    assert inflight_at_signal > 0


def test_serve_reports_a_bad_model_file(tmp_path: Path):
    import subprocess

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(bad), "--port", "0", "--metrics-port", "-1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert f"{bad}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("raw", [False, True], ids=["encoded", "raw"])
def test_client_csv_reads_back_as_the_backends_output(tiny_onnx, camera_frames, direct_output, tmp_path, raw):
    from trainer.data import read_annotations

    images = tmp_path / "images"
    images.mkdir()
    names = [f"{i:04d}.png" for i in range(len(camera_frames))]
    for name, frame in zip(names, camera_frames):
        cv2.imwrite(str(images / name), frame)
    out = tmp_path / "results.csv"

    async def main():
        async with running_server(tiny_onnx) as server:
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.cli", "client", "--target", server.address, "--images", str(images),
                "--streams", "3", "--out", str(out), *(["--raw"] if raw else []),
                cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            _, stderr = await client.communicate()
            return client.returncode, stderr.decode()

    returncode, stderr = asyncio.run(main())
    assert returncode == 0, stderr
    assert "50 of 50 frames inspected" in stderr
    predicted = read_annotations(out, num_classes=4, height=64, width=320)
    assert sorted(predicted) == names  # every image listed, defect-free ones too
    for i, name in enumerate(names):
        expected = [rle if present else "" for rle, present in zip(direct_output["rles"][i], direct_output["present"][i])]
        assert predicted[name] == expected
    assert any(any(r) for r in predicted.values()) and not all(all(r) for r in predicted.values())


def test_client_lists_failed_frames_and_exits_1(tiny_onnx, camera_frames, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "good.png"), camera_frames[0])
    cv2.imwrite(str(images / "small.png"), np.zeros((10, 10), np.uint8))
    out = tmp_path / "results.csv"

    async def main():
        async with running_server(tiny_onnx) as server:
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.cli", "client", "--target", server.address, "--images", str(images),
                "--out", str(out), cwd=REPO, stderr=asyncio.subprocess.PIPE,
            )
            _, stderr = await client.communicate()
            return client.returncode, stderr.decode()

    returncode, stderr = asyncio.run(main())
    assert returncode == 1
    assert "1 of 2 frames inspected" in stderr
    assert "failed small.png: camera 'cam1' frame 0: PNG image is 10x10" in stderr
    assert {line.split(",")[0] for line in out.read_text().splitlines()[1:]} == {"good.png"}
