"""Issue 16's hostile-camera cases, each against a real server on 127.0.0.1 with real bytes: an
oversize camera id that used to leak every in-flight slot, corrupt JPEGs that used to be answered,
unbounded camera ids in status and metrics, a load error printed twice, and the oversize message."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from protos.inspection.v1 import inspection_pb2 as pb
from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from server.config import MAX_CAMERA_ID_BYTES, MAX_MESSAGE_BYTES
from tests.jpeg_faults import declaring, jpeg, truncated_mid_scan, with_orientation
from tests.server.conftest import FRAME_SIZE, running_server, scrape, wait_until
from tests.server.test_cli import REPO, ServeProcess
from tests.server.test_service import assert_equals_direct, assert_has_defects, make_request, stub_for

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
BIG_MESSAGES = [("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", 2 * MAX_MESSAGE_BYTES)]


# --------------------------------------------------------------------------- 1. the slot leak


def test_oversize_camera_ids_leak_no_slot_and_sigterm_exits_at_once(defect_onnx, camera_frames, direct_output):
    # Four streams: 40 good frames, one whose camera_id is 9 MiB, then more good frames (so each
    # stream's 64 slots are full when the bad frame is answered). Its error answer used to echo the
    # id twice (18 MiB > the 16 MiB send limit): the write failed, the handler was cancelled in its
    # cleanup, and the four streams held all 256 server-wide slots for ever.
    server = ServeProcess(defect_onnx, "--metrics-port", "0", "--grace", "30", "--max-batch", "8")
    metrics_port = int(re.search(r"metrics_port=(\d+)", server.log).group(1))
    huge_id = "x" * (9 * 1024 * 1024)
    outcomes: dict[int, tuple] = {}

    def bad_camera(n: int) -> None:
        def frames():
            for i in range(40):
                yield make_request(f"cam{n}", i, camera_frames[i], "gray8")
            yield pb.InspectRequest(camera_id=huge_id, frame_id=40, encoded_image=b"\xff\xd8")
            for i in range(41, 141):
                yield make_request(f"cam{n}", i, camera_frames[i % 50], "gray8")

        with grpc.insecure_channel(server.address, options=BIG_MESSAGES) as channel:
            try:
                responses = list(pb_grpc.InspectionServiceStub(channel).Inspect(frames(), timeout=120))
                outcomes[n] = (grpc.StatusCode.OK, responses)
            except grpc.RpcError as exc:
                outcomes[n] = (exc.code(), exc.details())

    try:
        cameras = [threading.Thread(target=bad_camera, args=(n,)) for n in range(4)]
        for thread in cameras:
            thread.start()
        for thread in cameras:
            thread.join(timeout=180)
        for n, (code, responses) in outcomes.items():
            assert code == grpc.StatusCode.OK, (n, code, responses)
            assert [r.frame_id for r in responses] == list(range(141))
            bad = responses[40]
            assert bad.error.code == INVALID_ARGUMENT and bad.camera_id == ""
            assert f"at most {MAX_CAMERA_ID_BYTES} are allowed" in bad.error.message
            assert len(bad.error.message) < 400  # the id is quoted cut short, not echoed
            for r in responses[:40] + responses[41:]:
                assert_equals_direct(r, direct_output, r.frame_id % 50)
            assert_has_defects(responses[:40])
        # A fifth stream is served fully, and nothing stays in flight.
        with grpc.insecure_channel(server.address) as channel:
            fifth = list(pb_grpc.InspectionServiceStub(channel).Inspect(
                (make_request("cam5", i, camera_frames[i], "gray8") for i in range(50)), timeout=60))
        assert [r.frame_id for r in fifth] == list(range(50))
        for r in fifth:
            assert_equals_direct(r, direct_output, r.frame_id)
        deadline = time.monotonic() + 10
        while scrape(metrics_port)[("inspection_inflight_frames", ())] != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = scrape(metrics_port)
        assert metrics[("inspection_inflight_frames", ())] == 0
        assert metrics[("inspection_frames_total", (("status", "invalid_argument"),))] == 4
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        returncode = server.process.wait(timeout=60)
        stop_s = time.monotonic() - signalled
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert returncode == 0, server.log
    assert "grace_expired" not in server.log
    # With a leaked slot the server waits out its whole 30 s grace; a clean one stops at once.
    assert stop_s < 5, f"SIGTERM took {stop_s:.1f} s:\n{server.log[-3000:]}"
    assert len(server.log) < 200_000  # and the log never carried the 9 MiB id


def test_camera_id_bound_is_in_utf8_bytes(defect_onnx, camera_frames, direct_output):
    fits = "é" * (MAX_CAMERA_ID_BYTES // 2)  # 2 bytes each: exactly the bound
    over = fits + "x"

    async def main():
        async with running_server(defect_onnx) as server:
            channel, stub = stub_for(server)
            async with channel:
                ok = await stub.InspectOne(make_request(fits, 0, camera_frames[0]))
                refused = await stub.InspectOne(make_request(over, 1, camera_frames[1]))
            return ok, refused

    ok, refused = asyncio.run(main())
    assert_equals_direct(ok, direct_output, 0)
    assert ok.camera_id == fits
    assert refused.error.code == INVALID_ARGUMENT
    assert f"camera_id is {MAX_CAMERA_ID_BYTES + 1} bytes of UTF-8" in refused.error.message


# --------------------------------------------------------------------------- 2. corrupt JPEGs


def test_corrupt_jpegs_are_invalid_argument_and_orientation_is_ignored(defect_onnx, camera_frames, direct_output):
    h, w = FRAME_SIZE
    intact = jpeg(camera_frames[0])
    cases = {
        "truncated mid-scan": truncated_mid_scan(intact),
        # The header claims 2x the size of its scan data (the 1600x256 over 800x128).
        "header claims more": declaring(jpeg(camera_frames[1][: h // 2, : w // 2]), w, h),
    }

    async def main():
        async with running_server(defect_onnx) as server:
            channel, stub = stub_for(server)
            async with channel:
                requests = [pb.InspectRequest(camera_id="cam", frame_id=i, encoded_image=data)
                            for i, data in enumerate(cases.values())]
                requests += [pb.InspectRequest(camera_id="cam", frame_id=2, encoded_image=intact),
                             pb.InspectRequest(camera_id="cam", frame_id=3, encoded_image=with_orientation(intact, 3)),
                             make_request("cam", 4, camera_frames[4])]

                async def frames():
                    for r in requests:
                        yield r

                return [r async for r in stub.Inspect(frames())]

    responses = asyncio.run(main())
    assert [r.frame_id for r in responses] == [0, 1, 2, 3, 4]
    for name, r in zip(cases, responses[:2]):
        assert r.error.code == INVALID_ARGUMENT, (name, r)
        assert "JPEG image is corrupt or truncated" in r.error.message, (name, r.error.message)
    plain, tagged = responses[2], responses[3]
    assert not plain.HasField("error") and not tagged.HasField("error")
    # An EXIF "rotate 180" tag changes nothing: the same frame, the same answer.
    assert [d.rle for d in tagged.defects] == [d.rle for d in plain.defects]
    assert_equals_direct(responses[4], direct_output, 4)  # the stream went on after the bad frames


# --------------------------------------------------------------------------- 4. bounded status and metrics


def test_status_and_metrics_stay_bounded_with_many_cameras(drift_onnx, camera_frames):
    # 40 cameras with ids at the bound, 6 cameras' worth of labels and 10 of status entries;
    # then 300 ids of 64 KiB, each refused, none reaching the drift monitor, status or metrics.
    ids = [f"{n:03d}".ljust(MAX_CAMERA_ID_BYTES, "c") for n in range(40)]

    async def main():
        async with running_server(drift_onnx, metrics_port=0, max_metric_cameras=6, max_status_cameras=10,
                                  drift_window=20, drift_min_frames=10) as server:
            channel, stub = stub_for(server)
            async with channel:
                async def frames():
                    for i, camera in enumerate(ids):
                        yield make_request(camera, i, camera_frames[i % 50], "gray8")

                answered = [r async for r in stub.Inspect(frames())]
                await wait_until(lambda: server.line_status().cameras_tracked == 40, what="the drift monitor")

                async def long_ids():
                    for i in range(300):
                        yield make_request(f"{i:03d}" + "L" * 65536, i, camera_frames[0], "gray8")

                refused = [r async for r in stub.Inspect(long_ids())]
                status = await stub.GetLineStatus(pb.GetLineStatusRequest())
            return answered, refused, status, await asyncio.to_thread(scrape, server.metrics_port)

    answered, refused, status, metrics = asyncio.run(main())
    assert all(not r.HasField("error") for r in answered)
    assert len(refused) == 300 and all(r.error.code == INVALID_ARGUMENT for r in refused)
    assert status.cameras_tracked == 40 and len(status.cameras) == 10 and status.cameras_omitted == 30
    # The most recently seen first (batches of one stream reach the monitor about in frame order).
    shown = [c.camera_id for c in status.cameras]
    assert len(set(shown)) == 10 and set(shown) <= set(ids[-20:])
    assert status.ByteSize() < 64 * 1024
    from client.status import format_status

    assert "... and 30 more cameras not listed" in format_status(status)  # `server status` says so
    cameras = {dict(labels)["camera"] for (name, labels) in metrics if name == "inspection_drift_window_frames"}
    assert cameras == set(ids[:6]) | {"other"}
    assert metrics[("inspection_drift_window_frames", (("camera", "other"),))] == 34  # one frame each
    assert metrics[("inspection_drift_cameras", ())] == 40


# --------------------------------------------------------------------------- 5. load error once


def test_load_error_is_printed_once(tmp_path):
    # A real process: its log handler writes to stderr as in production (pytest's would capture it).
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(bad), "--port", "0", "--metrics-port", "-1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    mentions = [line for line in done.stderr.splitlines() if "cannot load this model" in line]
    assert len(mentions) == 1 and mentions[0].startswith(f"server serve: error: {bad}: "), done.stderr
    assert " ERROR " not in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- 6. oversize message


def test_a_message_over_the_limit_ends_the_stream_as_the_proto_says(tiny_onnx, camera_frames):
    # Documented behaviour (inspection.proto, Inspect): gRPC refuses the message before the service
    # sees it and ends the whole stream with RESOURCE_EXHAUSTED; the camera library must not send it.
    async def main():
        async with running_server(tiny_onnx, max_message_bytes=64 * 1024) as server:
            channel = grpc.aio.insecure_channel(server.address, options=BIG_MESSAGES)
            async with channel:
                stub = pb_grpc.InspectionServiceStub(channel)

                async def frames():
                    yield make_request("cam", 0, camera_frames[0], "gray8")
                    yield pb.InspectRequest(camera_id="cam", frame_id=1, encoded_image=b"\xff\xd8" + bytes(70_000))

                with pytest.raises(grpc.aio.AioRpcError) as info:
                    [r async for r in stub.Inspect(frames())]
            await wait_until(lambda: server.inflight == server.open_streams == 0, what="cleanup")
            return info.value.code()

    assert asyncio.run(main()) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_max_message_bytes_is_one_constant():
    from server.config import ServerConfig

    assert ServerConfig().max_message_bytes == MAX_MESSAGE_BYTES
    assert np.iinfo(np.int32).max > MAX_MESSAGE_BYTES  # a valid gRPC channel option


# --------------------------------------------------------------------------- issue 24.7: camera ids that are not UTF-8


def raw_inspect(channel: grpc.aio.Channel):
    """``Inspect`` sending pre-serialized bytes: what a camera with another protobuf library may put on the wire."""
    return channel.stream_stream("/inspection.v1.InspectionService/Inspect", request_serializer=lambda data: data,
                                 response_deserializer=pb.InspectResponse.FromString)


def test_a_camera_id_that_is_not_utf8_fails_its_frame_and_the_stream_goes_on(defect_onnx, camera_frames,
                                                                             direct_output):
    # proto3 refuses a whole message whose string field is not valid UTF-8: the server used to end the
    # stream with UNKNOWN "DecodeError" there, and the frames after it were never read.
    bad = pb.InspectRequest(camera_id="cam", frame_id=1, encoded_image=b"x").SerializeToString()
    bad = bad.replace(b"\x0a\x03cam", b"\x0a\x05\xff\xfecam", 1)  # field 1 (camera_id): 5 bytes, not UTF-8
    messages = [make_request("cam", 0, camera_frames[0], "gray8").SerializeToString(), bad,
                make_request("cam", 2, camera_frames[2], "gray8").SerializeToString()]

    async def main():
        async with running_server(defect_onnx) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                async def frames():
                    for data in messages:
                        yield data

                answers = [r async for r in raw_inspect(channel)(frames())]
                one = await channel.unary_unary("/inspection.v1.InspectionService/InspectOne",
                                                request_serializer=lambda data: data,
                                                response_deserializer=pb.InspectResponse.FromString)(bad)
            return answers, one, server.stats()

    answers, one, stats = asyncio.run(main())
    assert [a.frame_id for a in answers] == [0, 1, 2]
    assert_equals_direct(answers[0], direct_output, 0)
    assert_equals_direct(answers[2], direct_output, 2)
    for refused in (answers[1], one):
        assert refused.error.code == INVALID_ARGUMENT and refused.camera_id == "" and refused.frame_id == 1
        assert "camera_id is not valid UTF-8" in refused.error.message, refused.error.message
        assert refused.error.message.startswith("camera b'\\xff\\xfecam' frame 1: ")  # the id, as a bytes literal
    assert stats["accepted"] == stats["answered"] == 4


def test_a_message_that_is_no_request_ends_the_stream_with_a_final_status(defect_onnx, camera_frames, direct_output):
    from server.config import RESEND_FINAL, RESEND_KEY

    async def main():
        async with running_server(defect_onnx) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                async def frames():
                    yield make_request("cam", 0, camera_frames[0], "gray8").SerializeToString()
                    yield b"\x0a\xff\x01"  # a camera_id of 255 bytes, then the message ends

                call = raw_inspect(channel)(frames())
                answers = []
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    async for answer in call:
                        answers.append(answer)
            return answers, ended.value

    answers, ended = asyncio.run(main())
    assert [a.frame_id for a in answers] == [0]
    assert_equals_direct(answers[0], direct_output, 0)
    assert ended.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 2 of the stream: the message is not an InspectRequest" in ended.details()
    assert dict(ended.trailing_metadata())[RESEND_KEY] == RESEND_FINAL  # the camera library stops, no resend
