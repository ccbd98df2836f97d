"""Line feedback in a real server (127.0.0.1, port 0, the tiny exported model): drift monitoring per
camera in GetLineStatus and /metrics, and capture of frames for retraining from ``server serve`` flags."""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from engine import drift
from protos.inspection.v1 import inspection_pb2 as pb
from server import config
from tests.server.conftest import line_frames, running_server, scrape, wait_until, with_drift_reference
from tests.server.test_service import assert_equals_direct, make_request, stub_for

# Frames per camera, the server's default minimum fill: against the 256-frame reference, PSI and KS of
# unshifted frames stay well below their thresholds (KS: 1.95 * sqrt(1/200 + 1/256) = 0.18 < 0.2 at 99.9 %).
WINDOW = 200


async def stream(stub, camera_id: str, frames: np.ndarray, kind: str = "gray8") -> list[pb.InspectResponse]:
    async def requests():
        for i, frame in enumerate(frames):
            yield make_request(camera_id, i, frame, kind)

    return [r async for r in stub.Inspect(requests())]


def serve_config(*argv: str):
    """The ``ServerConfig`` that ``server serve`` builds from these flags (its own parser and code)."""
    from server import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    config = serve.config_from_args(parser.parse_args(["--model", "unused.onnx", *argv]))
    return {f.name: getattr(config, f.name) for f in fields(config)}


# --------------------------------------------------------------------------- drift


def test_brightness_shift_drifts_on_its_camera_only(drift_onnx, drift_reference, drift_backend, caplog):
    # The model and its reference are what 'trainer export' wrote (see the drift_onnx fixture).
    steady = line_frames(WINDOW, seed=2)
    brighter = np.clip(steady.astype(np.int16) + 20, 0, 255).astype(np.uint8)  # a lamp change on one camera

    async def main():
        config = serve_config("--drift-window", str(WINDOW), "--drift-min-frames", str(WINDOW), "--port", "0",
                              "--metrics-port", "0", "--max-batch", "8")
        async with running_server(drift_onnx, **config) as server:
            channel, stub = stub_for(server)
            async with channel:
                answers = await asyncio.gather(stream(stub, "steady", steady), stream(stub, "brighter", brighter))
                await wait_until(lambda: sum(c.frames_seen for c in server.line_status().cameras) == 2 * WINDOW,
                                 what="the line feedback to take every batch")
                status = await stub.GetLineStatus(pb.GetLineStatusRequest())
                only = await stub.GetLineStatus(pb.GetLineStatusRequest(camera_id="brighter"))
            return answers, status, only, await asyncio.to_thread(scrape, server.metrics_port)

    with caplog.at_level(logging.INFO):
        answers, status, only, metrics = asyncio.run(main())
    assert all(not r.HasField("error") for responses in answers for r in responses)
    assert status.drift_enabled and status.drift_state == "on"
    assert list(status.statistics) == list(drift_reference.names)
    assert (status.psi_threshold, status.ks_threshold) == (config.DEFAULT_PSI_THRESHOLD, config.DEFAULT_KS_THRESHOLD)
    assert (status.drift_window, status.drift_min_frames) == (WINDOW, WINDOW)
    cameras = {c.camera_id: c for c in status.cameras}
    assert sorted(cameras) == ["brighter", "steady"]
    assert [c.camera_id for c in only.cameras] == ["brighter"]

    for name, frames in (("steady", steady), ("brighter", brighter)):
        camera = cameras[name]
        assert (camera.frames_seen, camera.window_fill, camera.scored) == (WINDOW, WINDOW, True)
        # The server's scores are those of the statistics of exactly these frames and the model's
        # counts on them (ONNX Runtime's CPU counts do not depend on the batch a frame ran in).
        expected = drift.drift_scores(drift_reference, drift_reference.line_stats(frames, drift_backend.infer(frames).counts))
        assert [s.statistic for s in camera.scores] == list(drift_reference.names)
        for score in camera.scores:
            assert score.psi == pytest.approx(expected[score.statistic]["psi"], abs=1e-9)
            if expected[score.statistic]["ks"] is None:
                assert not score.HasField("ks")
            else:
                assert score.ks == pytest.approx(expected[score.statistic]["ks"], abs=1e-9)

    steady_scores = {s.statistic: s for s in cameras["steady"].scores}
    assert max(s.psi for s in steady_scores.values()) < status.psi_threshold
    assert max(s.ks for s in steady_scores.values() if s.HasField("ks")) < status.ks_threshold
    assert list(cameras["steady"].over_threshold) == []
    shifted = {s.statistic: s for s in cameras["brighter"].scores}["brightness"]
    assert shifted.psi > status.psi_threshold and shifted.psi_over_threshold
    assert shifted.ks > status.ks_threshold and shifted.ks_over_threshold
    assert {"brightness/psi", "brightness/ks"} <= set(cameras["brighter"].over_threshold)

    def sample(name: str, **labels: str) -> float:
        return metrics[(name, tuple(sorted(labels.items())))]

    assert sample("inspection_drift_enabled") == 1
    assert sample("inspection_drift_threshold", score="psi") == config.DEFAULT_PSI_THRESHOLD
    labels = {"camera": "brighter", "statistic": "brightness"}
    assert sample("inspection_drift_score", score="psi", **labels) == pytest.approx(shifted.psi)
    assert sample("inspection_drift_over_threshold", score="psi", **labels) == 1
    assert sample("inspection_drift_over_threshold", score="ks", **labels) == 1
    steady_flags = [v for (name, lab), v in metrics.items()
                    if name == "inspection_drift_over_threshold" and ("camera", "steady") in lab]
    assert len(steady_flags) == len(drift_reference.names) + sum(s.ks_applies for s in drift_reference.stats)
    assert not any(steady_flags)
    assert sample("inspection_drift_window_frames", camera="steady") == WINDOW
    assert sample("inspection_drift_frames_total", camera="brighter") == WINDOW

    # One warning per crossing, naming the camera, in the server's log; none for the steady camera.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "drift" in r.getMessage()]
    assert any("camera 'brighter': brightness PSI" in m and "crossed its threshold" in m for m in warnings), warnings
    assert not any("'steady'" in m for m in warnings)
    assert sum("brightness PSI" in m for m in warnings) == 1


@pytest.mark.parametrize(
    ("reference", "state"),
    [
        (None, "no reference in this model"),
        ({"format": "strip-inspection/drift-reference/0"},
         "drift reference in this model is unusable: drift reference has format 'strip-inspection/drift-reference/0', "
         f"expected {drift.FORMAT!r}"),
    ],
)
def test_without_a_usable_reference_drift_is_off_and_says_why(
    reference, state, defect_onnx, camera_frames, direct_output, tmp_path, caplog
):
    model = with_drift_reference(defect_onnx, reference, tmp_path / "model.onnx")

    async def main():
        async with running_server(model, metrics_port=0) as server:
            channel, stub = stub_for(server)
            async with channel:
                answers = await stream(stub, "cam", camera_frames[:4])
                status = await stub.GetLineStatus(pb.GetLineStatusRequest())
            return answers, status, await asyncio.to_thread(scrape, server.metrics_port), server.feedback

    with caplog.at_level(logging.INFO):
        answers, status, metrics, feedback = asyncio.run(main())
    for i, response in enumerate(answers):  # the model serves all the same
        assert_equals_direct(response, direct_output, i)
    assert not status.drift_enabled and status.drift_state == state
    assert not status.cameras and not status.statistics and not status.capture.enabled
    assert metrics[("inspection_drift_enabled", ())] == 0
    assert not any(name.startswith(("inspection_drift_score", "inspection_capture")) for name, _ in metrics)
    assert f"event=drift_off reason={state!r}" in caplog.text
    assert not feedback.active  # nothing to do per batch: the batcher got no hook


# --------------------------------------------------------------------------- capture


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_serve_capture_flags_write_a_folder_the_trainer_loads(defect_onnx, direct_backend, synth_dir, tmp_path):
    from trainer.data import DataConfig, SeverstalDataset, load_samples, read_image

    cfg = DataConfig(num_classes=4, height=64, width=320)
    originals = load_samples(synth_dir, cfg)[:12]
    jpegs = [s.path.read_bytes() for s in originals]  # camera "line-a" sends its JPEGs as they are
    frames = np.stack([read_image(s.path, cfg) for s in originals])  # camera "line-b" sends raw GRAY8
    captures = tmp_path / "captures"

    async def main():
        config = serve_config("--port", "0", "--metrics-port", "-1", "--capture-dir", str(captures),
                              "--capture", "defects,sample:1.0")
        async with running_server(defect_onnx, **config) as server:
            channel, stub = stub_for(server)
            async with channel:

                async def encoded():
                    for i, data in enumerate(jpegs):
                        yield pb.InspectRequest(camera_id="line-a", frame_id=i, encoded_image=data,
                                                captured_at_unix_ns=1_700_000_000_000_000_000 + i)

                answers = await asyncio.gather(
                    _collect(stub.Inspect(encoded())), stream(stub, "line-b", frames)
                )
                during = await stub.GetLineStatus(pb.GetLineStatusRequest())
        return answers, during, server.line_status()  # after stop: the writer has saved everything

    answers, during, after = asyncio.run(main())
    direct = direct_backend.infer(frames)
    rles = direct.rle()
    for responses in answers:
        for i, response in enumerate(responses):
            assert_equals_direct(response, {"counts": direct.counts.tolist(), "present": direct.present.tolist(),
                                            "rles": rles}, i)
    assert during.capture.enabled and during.capture.policy == "defects,sample:1"
    assert during.capture.directory == str(captures)
    c = after.capture
    assert (c.offered, c.selected, c.written, c.queued) == (24, 24, 24, 0)
    assert c.skipped_queue_full == c.skipped_quota == c.skipped_error == 0
    assert c.bytes_used > 0 and c.quota_bytes == 5 * 10**9

    samples = load_samples(captures, cfg)  # the trainer's reader accepts the folder as it is
    assert len(samples) == 24
    rows = {r["ImageId"]: r for r in read_rows(captures / "captures.csv")}
    assert sorted(rows) == [s.image_id for s in samples]
    dataset = SeverstalDataset(samples, cfg)
    model_version = direct_backend.metadata.model_version
    seen = set()
    for sample, (image, masks) in zip(samples, dataset):
        row = rows[sample.image_id]
        camera, i = row["CameraId"], int(row["FrameId"])
        seen.add((camera, i))
        assert row["ModelVersion"] == model_version
        present = direct.present[i]
        assert row["Reason"] == ("defects+sample" if present.any() else "sample")
        assert row["PixelCounts"] == " ".join(map(str, direct.counts[i]))
        np.testing.assert_array_equal(image.numpy(), frames[i])
        # The training labels are the model's decisions: present classes' masks, nothing else.
        np.testing.assert_array_equal(masks.numpy(), direct.masks[i] * present[:, None, None])
        if camera == "line-a":
            assert sample.image_id.endswith(".jpg") and sample.path.read_bytes() == jpegs[i]  # original bytes
            assert row["CapturedAtNs"] == str(1_700_000_000_000_000_000 + i)
        else:
            assert sample.image_id.endswith(".png")  # raw frames are saved losslessly
    assert seen == {(camera, i) for camera in ("line-a", "line-b") for i in range(12)}
    assert direct.present.any() and not direct.present.all()  # both reasons were exercised


async def _collect(call) -> list[pb.InspectResponse]:
    return [r async for r in call]


@pytest.mark.parametrize("failure", ["full quota", "unusable folder"])
def test_capture_that_cannot_save_skips_and_counts_while_every_frame_is_answered(
    failure, defect_onnx, camera_frames, direct_output, tmp_path
):
    if failure == "full quota":
        folder, flags, outcome = tmp_path / "captures", ["--capture-quota-gb", "1e-9"], "skipped_quota"  # 1 byte
    else:
        folder, flags, outcome = tmp_path / "a-file", [], "skipped_error"
        folder.write_text("a file where the capture folder should be")
    frames = camera_frames[:20]

    async def main():
        config = serve_config("--port", "0", "--metrics-port", "0", "--capture-dir", str(folder),
                              "--capture", "sample:1.0", *flags)
        async with running_server(defect_onnx, **config) as server:
            channel, stub = stub_for(server)
            async with channel:
                answers = await asyncio.gather(stream(stub, "cam0", frames[:10]), stream(stub, "cam1", frames[10:], "png"))
                await wait_until(lambda: getattr(server.line_status().capture, outcome) == 20,
                                 what=f"every capture to be counted as {outcome}")
                status = await stub.GetLineStatus(pb.GetLineStatusRequest())
            return answers, status, await asyncio.to_thread(scrape, server.metrics_port)

    answers, status, metrics = asyncio.run(main())
    for k, responses in enumerate(answers):
        assert [r.frame_id for r in responses] == list(range(10))
        for i, response in enumerate(responses):
            assert_equals_direct(response, direct_output, 10 * k + i)
    c = status.capture
    assert (c.offered, c.selected, c.written, getattr(c, outcome)) == (20, 20, 0, 20)
    assert metrics[("inspection_capture_total", (("outcome", outcome),))] == 20
    assert metrics[("inspection_capture_total", (("outcome", "written"),))] == 0
    assert metrics[("inspection_frames_total", (("status", "ok"),))] == 20
    if failure == "full quota":
        assert not any((folder / "train_images").iterdir())
    else:
        assert folder.read_text() == "a file where the capture folder should be"


# --------------------------------------------------------------------------- server status


def test_server_status_prints_the_line_status(drift_onnx, camera_frames, tmp_path, capsys):
    import json

    import grpc

    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
    from server.cli import main
    from tests.server.conftest import ServerThread

    config = serve_config("--port", "0", "--metrics-port", "-1", "--drift-window", "10", "--drift-min-frames", "5",
                          "--capture-dir", str(tmp_path / "c"), "--capture", "sample:1.0")
    with ServerThread(drift_onnx, **config) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InspectionServiceStub(channel)
            list(stub.Inspect(make_request("cam-a", i, f) for i, f in enumerate(camera_frames[:6])))
            list(stub.Inspect(make_request("cam-b", i, f) for i, f in enumerate(camera_frames[:3])))
        deadline = time.monotonic() + 30
        while True:  # the line feedback runs after the answers: wait until it has taken all 9 frames
            expected = server.line_status()
            if expected.capture.written == sum(c.frames_seen for c in expected.cameras) == 9:
                break
            assert time.monotonic() < deadline, expected
            time.sleep(0.01)
        assert main(["status", "--target", server.address]) == 0
        text = capsys.readouterr().out
        assert main(["status", "--target", server.address, "--camera", "cam-b", "--json"]) == 0
        as_json = json.loads(capsys.readouterr().out)
    assert "drift: on; windows of 10 frames, scored from 5; thresholds PSI 0.25, KS 0.2" in text
    a = {c.camera_id: c for c in expected.cameras}["cam-a"]
    assert f"camera 'cam-a': 6 frames seen, window 6/10, over threshold: {', '.join(a.over_threshold) or 'none'}" in text
    assert f"  brightness       PSI {a.scores[0].psi:7.3f}" in text
    assert "camera 'cam-b': 3 frames seen, window 3/10" in text and "not scored until the window holds 5 frames" in text
    assert "capture: sample:1 to " in text and "9 offered, 9 chosen, 9 written" in text
    assert [c["camera_id"] for c in as_json["cameras"]] == ["cam-b"] and as_json["drift_state"] == "on"


def test_server_status_reports_an_unreachable_server(capsys):
    import socket

    from server.cli import main

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["status", "--target", f"127.0.0.1:{port}", "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach an inspection server at 127.0.0.1:{port} within 1 s" in err and "Traceback" not in err


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--capture", "defects"], "--capture needs --capture-dir"),
        (["--capture-dir", "x", "--capture", "defects,glare"], "unknown token 'glare'"),
        (["--drift-window", "100", "--drift-min-frames", "200"], "--drift-min-frames) must lie in 1..drift_window"),
        (["--drift-psi-threshold", "0"], "--drift-psi-threshold) must be a positive number"),
    ],
)
def test_bad_feedback_flags_are_clear_errors(flags, message, tiny_onnx, capsys):
    from server.cli import main

    assert main(["serve", "--model", str(tiny_onnx), "--port", "0", "--metrics-port", "-1", *flags]) == 2
    err = capsys.readouterr().err
    assert "server serve: error:" in err and message in err and "Traceback" not in err


def test_feedback_that_falls_behind_skips_batches_without_blocking(drift_reference, direct_backend, camera_frames):
    from engine.metadata import ModelMetadata
    from server.batcher import FinishedBatch
    from server.feedback import LineFeedback

    meta = ModelMetadata.from_dict({**direct_backend.metadata.to_dict(), "drift_reference": drift_reference.to_dict()})
    feedback = LineFeedback(meta, drift_window=50, drift_min_frames=10, psi_threshold=0.25, ks_threshold=0.2,
                            max_pending=2)
    frames = camera_frames[:4]
    result = direct_backend.infer(frames)
    batch = FinishedBatch(["cam"] * 4, [None] * 4, frames, result, result.rle())
    # Holding the monitor's lock stalls the feedback thread inside the first batch, as a slow CPU would.
    with feedback.monitor._lock:
        for _ in range(5):
            feedback.submit(batch)  # returns at once whatever the thread is doing
        assert feedback.skipped_batches == 3  # one running, one waiting, three skipped
    feedback.close()
    assert feedback.status().cameras[0].frames_seen == 8
    assert feedback.status().feedback_skipped_batches == 3
