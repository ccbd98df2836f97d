"""The inspection service on a real gRPC server (127.0.0.1, port 0) with the tiny exported model.

Every answer is compared with the backend's direct output on the same frames, exactly: ONNX
Runtime's CPU kernels compute each frame independently of the others in its batch, so the
server's batching cannot change a single mask pixel.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.inspection.v1 import inspection_pb2 as pb
from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from tests.server.conftest import metric_samples, running_server, self_signed_cert, wait_until
from tests.server.test_decode import bad_requests


def make_request(camera_id: str, frame_id: int, frame: np.ndarray, kind: str = "png") -> pb.InspectRequest:
    request = pb.InspectRequest(camera_id=camera_id, frame_id=frame_id)
    h, w = frame.shape
    if kind == "png":
        request.encoded_image = cv2.imencode(".png", frame)[1].tobytes()
    elif kind == "gray8":
        request.raw_image.CopyFrom(pb.RawImage(width=w, height=h, channels=1, data=frame.tobytes()))
    elif kind == "bgr8":
        bgr = np.repeat(frame[:, :, None], 3, axis=2)  # identical channels convert back exactly
        request.raw_image.CopyFrom(pb.RawImage(width=w, height=h, channels=3, data=bgr.tobytes()))
    else:
        raise ValueError(kind)
    return request


def assert_equals_direct(response: pb.InspectResponse, direct: dict, i: int) -> None:
    assert not response.HasField("error"), response.error.message
    assert [d.class_id for d in response.defects] == [1, 2, 3, 4]
    assert [d.pixel_count for d in response.defects] == direct["counts"][i]
    assert [d.present for d in response.defects] == direct["present"][i]
    assert [d.rle for d in response.defects] == direct["rles"][i]


def stub_for(server) -> tuple[grpc.aio.Channel, pb_grpc.InspectionServiceStub]:
    channel = grpc.aio.insecure_channel(server.address)
    return channel, pb_grpc.InspectionServiceStub(channel)


def assert_has_defects(responses: list[pb.InspectResponse]) -> None:
    """The answers a same-answer check compared carry defects: agreeing on empty masks proves nothing."""
    assert any(d.present for r in responses for d in r.defects), "no answer has a defect present"
    assert sum(bool(d.rle) for r in responses for d in r.defects) >= len(responses) // 2


def test_the_defect_model_finds_its_defects_on_some_frames(direct_output: dict, camera_frames) -> None:
    # The same-answer checks below mean something only if masks, counts and decisions vary.
    from engine.rle import decode_many
    from tests.defect_model import BRIGHT, DARK

    present = np.array(direct_output["present"])
    counts = np.array(direct_output["counts"])
    assert 5 <= present[:, 0].sum() <= 45 and 5 <= present[:, 1].sum() <= 45  # scratches, pits: some frames
    assert (counts[:, 2] > 0).any() and not present[:, 2].any()  # pixels under the minimum area
    assert not counts[:, 3].any()
    assert len({tuple(c) for c in counts}) > 40
    # Known pixels: the scratch class lies on bright pixels, the pit class on dark ones.
    for i in np.flatnonzero(present[:, 0])[:3]:
        masks = decode_many(direct_output["rles"][i], *camera_frames.shape[1:])
        assert camera_frames[i][masks[0] > 0].mean() > BRIGHT - 30
    for i in np.flatnonzero(present[:, 1])[:3]:
        masks = decode_many(direct_output["rles"][i], *camera_frames.shape[1:])
        assert camera_frames[i][masks[1] > 0].mean() < DARK + 30


def test_four_streams_answered_once_in_order_equal_to_backend(defect_onnx, camera_frames, direct_output):
    kinds = ["png", "gray8", "bgr8", "png"]

    async def main():
        async with running_server(defect_onnx, max_batch=8) as server:
            channel, stub = stub_for(server)
            async with channel:

                async def camera(k: int) -> list[pb.InspectResponse]:
                    async def frames():
                        for i, frame in enumerate(camera_frames):
                            yield make_request(f"cam{k}", i, frame, kinds[k])

                    return [r async for r in stub.Inspect(frames())]

                answers = await asyncio.gather(*(camera(k) for k in range(4)))
            return answers, server.stats()

    answers, stats = asyncio.run(main())
    for k, responses in enumerate(answers):
        assert [(r.camera_id, r.frame_id) for r in responses] == [(f"cam{k}", i) for i in range(50)]
        for i, response in enumerate(responses):
            assert_equals_direct(response, direct_output, i)
            assert response.model_version.startswith("run-")
            t = response.timings
            assert t.total_us >= t.queue_us + t.inference_us and 1 <= t.batch_size <= 8
    assert_has_defects(answers[0])
    batch_sizes = [r.timings.batch_size for responses in answers for r in responses]
    assert max(batch_sizes) > 1  # frames of concurrent streams shared batches
    assert stats["accepted"] == stats["answered"] == 200
    assert stats["inflight"] == stats["open_streams"] == stats["frame_tasks"] == 0


def test_bad_frames_fail_alone(defect_onnx, camera_frames, direct_output):
    bad = bad_requests(camera_frames[0])

    async def main():
        async with running_server(defect_onnx) as server:
            channel, stub = stub_for(server)
            async with channel:
                plan: list[tuple[int, str | None]] = []  # (frame id, bad kind or None)

                async def mixed():
                    good = 0
                    for frame_id, kind in enumerate(k for name in bad for k in (name, None)):
                        plan.append((frame_id, kind))
                        if kind is None:
                            request = make_request("cam-mixed", frame_id, camera_frames[good], "gray8")
                            good += 1
                        else:
                            request = pb.InspectRequest()
                            request.CopyFrom(bad[kind][0])
                            request.camera_id, request.frame_id = "cam-mixed", frame_id
                        yield request

                async def clean():
                    for i, frame in enumerate(camera_frames[:20]):
                        yield make_request("cam-clean", i, frame)

                mixed_answers, clean_answers = await asyncio.gather(
                    _collect(stub.Inspect(mixed())), _collect(stub.Inspect(clean()))
                )
            return plan, mixed_answers, clean_answers, server.stats()

    plan, mixed_answers, clean_answers, stats = asyncio.run(main())
    assert [r.frame_id for r in mixed_answers] == [frame_id for frame_id, _ in plan]
    good = 0
    for (frame_id, kind), response in zip(plan, mixed_answers):
        if kind is None:
            assert_equals_direct(response, direct_output, good)
            good += 1
        else:
            assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], kind
            assert f"camera 'cam-mixed' frame {frame_id}:" in response.error.message
            assert bad[kind][1] in response.error.message, (kind, response.error.message)
            assert not response.defects
    for i, response in enumerate(clean_answers):
        assert_equals_direct(response, direct_output, i)
    assert_has_defects(clean_answers)
    assert stats["accepted"] == stats["answered"] == len(plan) + 20


async def _collect(call) -> list[pb.InspectResponse]:
    return [r async for r in call]


def test_inspect_one_and_model_info(defect_onnx, camera_frames, direct_output, direct_backend):
    async def main():
        async with running_server(defect_onnx, max_batch=4) as server:
            channel, stub = stub_for(server)
            async with channel:
                info = await stub.GetModelInfo(pb.GetModelInfoRequest())
                good = await stub.InspectOne(make_request("cam", 7, camera_frames[3], "bgr8"))
                bad = await stub.InspectOne(pb.InspectRequest(camera_id="cam", frame_id=8, encoded_image=b"xx"))
            return info, good, bad

    info, good, bad = asyncio.run(main())
    meta = direct_backend.metadata
    assert [(c.class_id, c.name) for c in info.classes] == list(zip(meta.class_ids, meta.class_names))
    assert (info.input_height, info.input_width) == meta.input_size
    assert list(info.thresholds) == pytest.approx(meta.thresholds, abs=1e-6)  # float32 on the wire
    assert list(info.min_areas) == meta.min_areas
    # The server runs the backend load_backend chooses for this file here (OpenVINO bf16 on a bf16 CPU
    # with openvino installed, else ONNX Runtime fp32), and says so and why.
    assert (info.backend, info.precision, info.model_version) == (
        direct_backend.name, direct_backend.precision, meta.model_version
    )
    assert info.backend_selection == direct_backend.selection and info.backend in info.backend_selection
    assert (info.max_batch, info.folds, info.device) == (4, 1, "cpu")
    assert good.frame_id == 7
    assert_equals_direct(good, direct_output, 3)
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "frame 8: encoded_image is neither JPEG nor PNG" in bad.error.message


def test_cancel_mid_stream_leaves_nothing_behind_then_a_new_stream_works(defect_onnx, camera_frames, direct_output):
    async def main():
        async with running_server(defect_onnx, max_batch=4) as server:
            channel, stub = stub_for(server)
            async with channel:

                async def endless():
                    for i in range(100_000):
                        yield make_request("cam", i, camera_frames[i % 50])

                call = stub.Inspect(endless())
                received = 0
                async for _ in call:
                    received += 1
                    if received == 5:
                        break
                call.cancel()
                await wait_until(
                    lambda: (server.open_streams, server.inflight, len(server._frame_tasks), server._batcher.queued)
                    == (0, 0, 0, 0),
                    what="the cancelled stream's frames to be cleaned up",
                )
                after_cancel = server.stats()

                async def ten():
                    for i in range(10):
                        yield make_request("cam-next", i, camera_frames[i])

                answers = await _collect(stub.Inspect(ten()))
            return after_cancel, answers

    after_cancel, answers = asyncio.run(main())
    assert after_cancel["accepted"] == after_cancel["answered"] + after_cancel["abandoned"]
    assert after_cancel["answered"] >= 5 and after_cancel["active_calls"] == 0
    assert [r.frame_id for r in answers] == list(range(10))
    for i, response in enumerate(answers):
        assert_equals_direct(response, direct_output, i)
    assert_has_defects(answers)


def test_saturated_server_refuses_inspect_one(tiny_onnx, camera_frames):
    # One in-flight frame fills the server (max_inflight=1); it stays in flight because the batcher
    # holds it for a second frame that never comes (max_batch=2, a 60 s delay).
    async def main():
        async with running_server(tiny_onnx, max_inflight=1, max_batch=2, max_delay_ms=60_000) as server:
            channel, stub = stub_for(server)
            async with channel:
                hold = asyncio.Event()

                async def one_frame():
                    yield make_request("cam", 0, camera_frames[0])
                    await hold.wait()

                call = stub.Inspect(one_frame())
                await wait_until(lambda: server.inflight == 1, what="the frame to be in flight")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.InspectOne(make_request("cam2", 0, camera_frames[1]))
                call.cancel()
                await wait_until(lambda: server.stats()["queued"] == server.inflight == server.open_streams == 0,
                                 what="the cancelled frame to leave")
                return refused.value, server.stats()

    refused, stats = asyncio.run(main())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 frames in flight (max 1)" in refused.details()
    assert (stats["answered"], stats["abandoned"], stats["frame_tasks"]) == (0, 1, 0)


def test_deadline_passes_before_the_frame_runs(tiny_onnx, camera_frames):
    async def main():
        async with running_server(tiny_onnx, max_batch=2, max_delay_ms=60_000) as server:
            channel, stub = stub_for(server)
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as expired:
                    await stub.InspectOne(make_request("cam", 0, camera_frames[0]), timeout=0.5)
                await wait_until(lambda: server.inflight == server.stats()["queued"] == 0, what="cleanup")
            batches = {s.name: s.value for m in server.metrics.batch_size.collect() for s in m.samples}
            return expired.value, batches

    expired, batches = asyncio.run(main())
    assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert batches["inspection_batch_size_count"] == 0  # the frame never reached the backend


def test_health_not_serving_then_serving_then_not_serving(tiny_onnx, camera_frames):
    from engine.backends import load_backend
    from server.service import SERVICE_NAME, InspectionServer, ServerConfig

    gate = threading.Event()

    def slow_loading_model():
        assert gate.wait(timeout=30), "the test never let the model load"
        return load_backend(tiny_onnx, device="cpu")

    async def main():
        server = InspectionServer(slow_loading_model, ServerConfig(port=0, metrics_port=None))
        await server.start(wait_ready=False)
        seen = []
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.InspectionServiceStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            seen.append((await watch.read()).status)
            check = await health.Check(health_pb2.HealthCheckRequest(service=""))
            with pytest.raises(grpc.aio.AioRpcError) as loading:
                await stub.InspectOne(make_request("cam", 0, camera_frames[0]))
            gate.set()
            seen.append((await watch.read()).status)
            await server.wait_ready()
            stopping = asyncio.ensure_future(server.stop(grace=5))
            seen.append((await watch.read()).status)
            await stopping
        return seen, check.status, loading.value

    seen, first_check, loading = asyncio.run(main())
    status = health_pb2.HealthCheckResponse
    assert seen == [status.NOT_SERVING, status.SERVING, status.NOT_SERVING]
    assert first_check == status.NOT_SERVING
    assert loading.code() == grpc.StatusCode.UNAVAILABLE and "loading" in loading.details()


def test_metrics_endpoint_serves_the_counters(tiny_onnx, camera_frames):
    async def main():
        async with running_server(tiny_onnx, metrics_port=0) as server:
            channel, stub = stub_for(server)
            async with channel:

                async def frames():
                    for i in range(5):
                        yield make_request("cam", i, camera_frames[i])
                    for i in range(5, 7):
                        yield pb.InspectRequest(camera_id="cam", frame_id=i, encoded_image=b"not an image")

                await _collect(stub.Inspect(frames()))
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
            return text

    text = asyncio.run(main())
    samples = metric_samples(text)
    assert samples[("inspection_frames_total", (("status", "ok"),))] == 5
    assert samples[("inspection_frames_total", (("status", "invalid_argument"),))] == 2
    assert samples[("inspection_batch_size_sum", ())] == 5  # frames that reached the backend
    assert samples[("inspection_queue_seconds_count", ())] == 5
    assert samples[("inspection_inference_seconds_count", ())] == samples[("inspection_batch_size_count", ())]
    assert samples[("inspection_total_seconds_count", ())] == 7
    assert samples[("inspection_decode_seconds_count", ())] == 5
    assert samples[("inspection_inflight_frames", ())] == 0
    assert samples[("inspection_open_streams", ())] == 0


def test_tls(defect_onnx, camera_frames, direct_output, tmp_path: Path):
    cert, key = self_signed_cert(tmp_path)

    async def main():
        async with running_server(defect_onnx, tls_cert=cert, tls_key=key) as server:
            credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(server.address, credentials) as channel:
                response = await pb_grpc.InspectionServiceStub(channel).InspectOne(
                    make_request("cam", 0, camera_frames[2]))
            async with grpc.aio.insecure_channel(server.address) as plaintext:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await pb_grpc.InspectionServiceStub(plaintext).InspectOne(
                        make_request("cam", 1, camera_frames[2]), timeout=5)
            return response, refused.value

    response, refused = asyncio.run(main())
    assert_equals_direct(response, direct_output, 2)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_the_services(tiny_onnx):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def main():
        async with running_server(tiny_onnx) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)

                async def ask():
                    yield reflection_pb2.ServerReflectionRequest(list_services="")

                return [r async for r in stub.ServerReflectionInfo(ask())]

    (response,) = asyncio.run(main())
    names = {s.name for s in response.list_services_response.service}
    assert {"inspection.v1.InspectionService", "grpc.health.v1.Health"} <= names


def test_frames_larger_than_grpcs_default_limit_reach_the_server(tiny_onnx):
    # gRPC refuses messages over 4 MB unless told otherwise; a 2048x2048 GRAY8 frame (4.2 MB) must
    # reach the frame checks (and fail there, being the wrong size) rather than the transport.
    side = 2048
    request = pb.InspectRequest(camera_id="big", frame_id=0, raw_image=pb.RawImage(
        width=side, height=side, channels=1, data=bytes(side * side)))
    assert request.ByteSize() > 4 * 1024 * 1024

    async def main():
        async with running_server(tiny_onnx) as server:
            options = [("grpc.max_send_message_length", 16 << 20)]
            async with grpc.aio.insecure_channel(server.address, options=options) as channel:
                return await pb_grpc.InspectionServiceStub(channel).InspectOne(request)

    response = asyncio.run(main())
    assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "raw_image is 2048x2048" in response.error.message


def test_start_raises_what_made_loading_fail(tmp_path: Path):
    from engine.backends import load_backend
    from server.service import InspectionServer, ServerConfig

    missing = tmp_path / "missing.onnx"

    async def main():
        server = InspectionServer(lambda: load_backend(missing), ServerConfig(port=0, metrics_port=None))
        with pytest.raises(FileNotFoundError, match="missing.onnx: no such model file"):
            await server.start()
        return server.stats()

    stats = asyncio.run(main())
    assert stats["open_streams"] == stats["inflight"] == 0
