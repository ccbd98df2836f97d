"""The live console (server/console.py) on a real server with the tiny model, read over real HTTP.

What the page is given (its JSON state over server-sent events) is compared with the streamed
answers; images are checked to be encoded once per frame shown, whatever the number of viewers,
and not at all while nobody watches.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import cv2
import grpc
import numpy as np
import pytest

from protos.inspection.v1 import inspection_pb2 as pb
from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from server.console import Console, ConsoleConfig
from server.console_state import quantile_from_buckets
from tests.server.conftest import running_server, self_signed_cert, wait_until


async def stream_camera(server, camera_id: str, frames: np.ndarray) -> list[pb.InspectResponse]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InspectionServiceStub(channel)

        async def requests():
            for i, frame in enumerate(frames):
                yield pb.InspectRequest(camera_id=camera_id, frame_id=i,
                                        encoded_image=cv2.imencode(".png", frame)[1].tobytes())

        return [r async for r in stub.Inspect(requests())]


async def read_events(session: aiohttp.ClientSession, url: str, count: int) -> list[dict]:
    """The first ``count`` states a viewer receives over server-sent events."""
    states = []
    async with session.get(url + "events") as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for line in response.content:
            if line.startswith(b"data: "):
                states.append(json.loads(line[6:]))
                if len(states) == count:
                    break
    return states


def expected_camera(answers: list[pb.InspectResponse]) -> dict:
    present = np.array([[d.present for d in a.defects] for a in answers])
    last = answers[-1]
    return {
        "frames": len(answers),
        "defective_frames": present.sum(axis=0).tolist(),
        "latest_frame": last.frame_id,
        "latest_counts": [d.pixel_count for d in last.defects],
        "latest_present": [d.present for d in last.defects],
        "defective_ids": [a.frame_id for a, p in zip(answers, present) if p.any()],
    }


def test_console_state_matches_the_answers_and_encodes_once_per_frame(tiny_onnx, camera_frames) -> None:
    async def main():
        async with running_server(tiny_onnx, max_batch=4) as server:
            console = Console(server, ConsoleConfig(port=0, refresh_hz=10, thumbnails=4, encodes_per_s=100))
            await console.start()
            try:
                answers = {cam: await stream_camera(server, cam, camera_frames[k::2])
                           for k, cam in enumerate(("cam-a", "cam-b"))}
                await asyncio.sleep(0.3)  # ticks without a viewer
                idle = (console.encoded, console.updates)
                async with aiohttp.ClientSession() as session:
                    views = await asyncio.gather(*(read_events(session, console.url, 3) for _ in range(3)))
                    state = views[0][-1]
                    images = {}
                    for view in views:
                        for camera in view[-1]["cameras"]:
                            for url in [camera["latest"]["image"]] + [t["thumb"] for t in camera["thumbnails"]]:
                                async with session.get(console.url.rstrip("/") + url) as response:
                                    assert response.status == 200 and response.content_type == "image/jpeg"
                                    images.setdefault(url, set()).add(await response.read())
                    async with session.get(console.url + "frames/999999.jpg") as response:
                        assert response.status == 404
                return answers, idle, state, images, console.encoded
            finally:
                await console.stop()

    answers, idle, state, images, encoded = asyncio.run(main())
    assert idle == (0, 0), "nothing is drawn or pushed while no viewer is connected"
    assert [c["id"] for c in state["cameras"]] == ["cam-a", "cam-b"]
    assert [c["name"] for c in state["classes"]] == ["pits/dents", "stains", "scratches", "cracks/scabs"]
    for camera in state["cameras"]:
        want = expected_camera(answers[camera["id"]])
        assert camera["frames"] == want["frames"]
        assert camera["defective_frames"] == want["defective_frames"]
        assert any(want["defective_frames"]), "the tiny model finds defects on these frames"
        assert camera["latest"]["frame_id"] == want["latest_frame"]
        assert camera["latest"]["counts"] == want["latest_counts"]
        assert camera["latest"]["present"] == want["latest_present"]
        assert [t["frame_id"] for t in camera["thumbnails"]] == want["defective_ids"][::-1][:4]
        assert sum(b["frames"] for b in camera["rate"]["buckets"]) == want["frames"]
    assert state["load"]["answered"] == 50 and state["load"]["errors"] == {}
    from engine.backends import choose_backend

    # The backend the server's load_backend picks here (OpenVINO bf16 on a bf16 CPU, else ONNX Runtime).
    assert state["model"]["backend"] == choose_backend(tiny_onnx, "cpu")[0]
    # Three viewers, the same bytes for each image; the server encoded each shown image once (the
    # latest frame of each camera plus each thumbnail: 2 + 2 x 4), not once per viewer.
    assert all(len(versions) == 1 for versions in images.values())
    assert len(images) == 2 + 2 * 4
    assert encoded == 2 + 2 * 4


def test_frame_image_is_the_overlay_drawing(defect_onnx, camera_frames, direct_output) -> None:
    from engine.overlay import draw_prediction
    from engine.rle import decode_many

    async def main():
        async with running_server(defect_onnx, max_batch=4) as server:
            console = Console(server, ConsoleConfig(port=0, refresh_hz=10, display_width=160, encodes_per_s=100))
            await console.start()
            try:
                await stream_camera(server, "cam", camera_frames)
                async with aiohttp.ClientSession() as session:
                    state = (await read_events(session, console.url, 1))[0]
                    async with session.get(console.url.rstrip("/") + state["cameras"][0]["latest"]["image"]) as r:
                        return await r.read()
            finally:
                await console.stop()

    data = asyncio.run(main())
    shown = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    i = len(camera_frames) - 1
    masks = decode_many(direct_output["rles"][i], 64, 320)
    drawn = draw_prediction(camera_frames[i], masks, direct_output["present"][i], size=(32, 160))
    other = draw_prediction(camera_frames[0], decode_many(direct_output["rles"][0], 64, 320),
                            direct_output["present"][0], size=(32, 160))
    assert shown.shape == drawn.shape == (32, 160, 3)
    # JPEG blurs one-pixel outlines and hatching at this size, so not equal: far closer to the
    # drawing of its own frame and prediction than to another's.
    error = np.abs(shown.astype(int) - drawn.astype(int)).mean()
    assert error < 0.5 * np.abs(shown.astype(int) - other.astype(int)).mean(), error


def test_encoding_keeps_to_its_budget(tiny_onnx, camera_frames) -> None:
    async def main():
        async with running_server(tiny_onnx, max_batch=4) as server:
            # One image per tick: the latest frame of the camera refreshed longest ago first.
            console = Console(server, ConsoleConfig(port=0, refresh_hz=10, encodes_per_s=10, thumbnails=2))
            await console.start()
            try:
                for camera in ("cam-a", "cam-b"):
                    await stream_camera(server, camera, camera_frames[:6])
                async with aiohttp.ClientSession() as session:
                    states = await read_events(session, console.url, 4)
            finally:
                await console.stop()
            return states, console.encoded

    states, encoded = asyncio.run(main())

    def shown(state: dict) -> tuple[int, int]:
        return (sum(c["latest"] is not None for c in state["cameras"]),
                sum(len(c["thumbnails"]) for c in state["cameras"]))

    # Each state has at most one more image than the one before: frames first, then thumbnails.
    assert [shown(s) for s in states] == [(1, 0), (2, 0), (2, 1), (2, 2)]
    assert encoded in (4, 5)  # one per state (and one more if a tick ran before the viewer's close was seen)


def test_stop_ends_open_event_streams(tiny_onnx) -> None:
    async def main():
        async with running_server(tiny_onnx) as server:
            console = Console(server, ConsoleConfig(port=0, refresh_hz=10))
            await console.start()
            async with aiohttp.ClientSession() as session:
                async with session.get(console.url + "events") as response:
                    await wait_until(lambda: console.viewers == 1, what="the viewer to connect")
                    await asyncio.wait_for(console.stop(), timeout=10)
                    rest = await asyncio.wait_for(response.content.read(), timeout=10)
            return rest, console.viewers

    rest, viewers = asyncio.run(main())
    assert viewers == 0
    assert b"retry:" in rest


def test_quantile_from_buckets_and_bad_config() -> None:
    bounds = [0.001, 0.01, 0.1, float("inf")]
    assert quantile_from_buckets(bounds, np.array([0, 90, 100, 100.0]), 0.95) == 0.1
    assert quantile_from_buckets(bounds, np.array([0, 96, 100, 100.0]), 0.95) == 0.01
    assert quantile_from_buckets(bounds, np.zeros(4), 0.95) is None
    with pytest.raises(ValueError, match="--console-port"):
        ConsoleConfig(port=70000)
    with pytest.raises(ValueError, match="private key"):
        ConsoleConfig(tls_cert="cert.pem")


def test_console_serves_https_with_the_servers_tls_pair(tiny_onnx, tmp_path) -> None:
    import ssl

    cert, key = self_signed_cert(tmp_path)

    async def main():
        async with running_server(tiny_onnx) as server:
            console = Console(server, ConsoleConfig(port=0, tls_cert=cert, tls_key=key))
            await console.start()
            try:
                trusted = ssl.create_default_context(cafile=str(cert))
                async with aiohttp.ClientSession() as session:
                    async with session.get(console.url, ssl=trusted) as response:
                        page = await response.text()
                    with pytest.raises(aiohttp.ClientError):
                        async with session.get(console.url.replace("https:", "http:")) as response:
                            await response.read()
            finally:
                await console.stop()
            return console.url, page

    url, page = asyncio.run(main())
    assert url.startswith("https://127.0.0.1:")
    assert "<title>Strip inspection console</title>" in page and 'new EventSource("events")' in page
