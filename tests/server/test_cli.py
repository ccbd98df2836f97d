"""``server serve`` and ``server client`` as real processes."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import grpc
import numpy as np

from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from tests.server.conftest import ServerThread, running_server
from tests.server.test_service import assert_equals_direct, assert_has_defects, make_request

REPO = Path(__file__).resolve().parents[2]


class ServeProcess:
    """``server serve`` as a real process on a free port, its log collected by a reader thread."""

    def __init__(self, model: Path, *flags: str, **popen) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--port", "0",
             "--metrics-port", "-1", "--device", "cpu", *flags],
            cwd=REPO, stderr=subprocess.PIPE, text=True, **popen,
        )
        self.lines: list[str] = []
        self.address: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._ready.wait(timeout=120) or self.address is None:
            self.process.kill()
            raise AssertionError("server serve did not become ready:\n" + self.log)

    def _read_log(self) -> None:
        for line in self.process.stderr:  # read to the end so the server never blocks on a full pipe
            self.lines.append(line)
            if match := re.search(r"event=start address=(\S+)", line):
                self.address = match.group(1)
            if "event=ready" in line:
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)


def test_sigterm_during_streaming_answers_every_accepted_frame(defect_onnx, camera_frames, direct_output):
    # The cameras use gRPC's synchronous API: the asyncio client may report a status that arrives
    # while it is still writing as INTERNAL "Internal error from Core" (grpc/grpc#36066).
    server = ServeProcess(defect_onnx, "--max-batch", "4", "--max-stream-inflight", "8")
    answers: dict[str, list] = {"cam0": [], "cam1": []}
    endings: dict[str, tuple] = {}
    enough = threading.Event()

    def camera(camera_id: str) -> None:
        def endless():
            for i in range(100_000):
                yield make_request(camera_id, i, camera_frames[i % 50], "gray8")

        with grpc.insecure_channel(server.address) as channel:
            try:
                for response in pb_grpc.InspectionServiceStub(channel).Inspect(endless()):
                    answers[camera_id].append(response)
                    if all(len(a) >= 5 for a in answers.values()):
                        enough.set()
                endings[camera_id] = (grpc.StatusCode.OK, "")
            except grpc.RpcError as exc:
                endings[camera_id] = (exc.code(), exc.details())

    cameras = [threading.Thread(target=camera, args=(c,)) for c in answers]
    try:
        for thread in cameras:
            thread.start()
        assert enough.wait(timeout=120), "the cameras got no answers:\n" + server.log
        server.process.send_signal(signal.SIGTERM)
        for thread in cameras:
            thread.join(timeout=120)
        returncode = server.process.wait(timeout=60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.log
    assert returncode == 0, log
    for code, details in endings.values():
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


def test_serve_reports_a_bad_model_file(tmp_path: Path, capsys):
    from server.cli import main

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    assert main(["serve", "--model", str(bad), "--port", "0", "--metrics-port", "-1"]) == 2
    err = capsys.readouterr().err
    # Whichever CPU backend auto chose names the file and why it cannot be read.
    assert f"server serve: error: {bad}: " in err
    assert "cannot load this model" in err
    assert "Traceback" not in err


def write_images(folder: Path, frames: np.ndarray) -> list[str]:
    folder.mkdir()
    names = [f"{i:04d}.png" for i in range(len(frames))]
    for name, frame in zip(names, frames):
        cv2.imwrite(str(folder / name), frame)
    return names


def test_client_csv_is_the_models_answer_and_scores_like_it(defect_onnx, direct_backend, tmp_path, capsys):
    """The CSV of a labelled (synthetic Severstal-format) folder reads back through the trainer's CSV
    reader as the backend's own gated masks, and the trainer's metrics score it exactly as they
    score the backend's direct output against the same labels."""
    from engine.rle import decode_many
    from server.cli import main
    from trainer.data import DataConfig, load_samples, read_annotations, read_image, sample_masks
    from trainer.metrics import mask_stats, score
    from trainer.synth import synthesize

    data = synthesize(tmp_path / "data", images=16, height=64, width=320, seed=3)
    cfg = DataConfig(height=64, width=320)
    samples = load_samples(data, cfg)
    out = tmp_path / "results.csv"
    with ServerThread(defect_onnx) as server:
        code = main(["client", "--target", server.address, "--images", str(data), "--streams", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "16 of 16 frames inspected" in err

    frames = np.stack([read_image(s.path, cfg) for s in samples])  # how training and evaluation read them
    direct = direct_backend.infer(frames)
    rles = direct.rle()
    predicted = read_annotations(out, num_classes=4, height=64, width=320)
    assert sorted(predicted) == [s.image_id for s in samples]  # every image listed, defect-free ones too
    for i, s in enumerate(samples):
        assert predicted[s.image_id] == [r if p else "" for r, p in zip(rles[i], direct.present[i])]

    truth = np.stack([sample_masks(s, cfg) for s in samples])
    csv_masks = np.stack([decode_many(predicted[s.image_id], 64, 320) for s in samples])
    from_csv = score(mask_stats(csv_masks, truth, present=csv_masks.any(axis=(2, 3))))
    from_model = score(mask_stats(direct.masks, truth, present=direct.present))
    assert from_csv.kaggle == from_model.kaggle
    assert from_csv.label_accuracy == from_model.label_accuracy
    assert from_csv.confusion == from_model.confusion
    assert direct.present.any() and truth.any()


def test_client_library_raw_frames(defect_onnx, camera_frames, direct_output, tmp_path):
    from server.client import list_images, run_cameras

    names = write_images(tmp_path / "images", camera_frames[:12])

    async def main():
        async with running_server(defect_onnx) as server:
            return await run_cameras(server.address, list_images(tmp_path / "images"), streams=5, raw=True, fps=100)

    run = asyncio.run(main())
    assert run.model_info.input_width == 320 and not run.unanswered and not run.failed
    assert [a.image_id for a in sorted(run.answers, key=lambda a: a.image_id)] == names
    for answer in run.answers:
        i = names.index(answer.image_id)
        assert answer.camera_id == f"cam{i % 5}" and answer.frame_id == i // 5
        assert_equals_direct(answer.response, direct_output, i)
    assert_has_defects([a.response for a in run.answers])


def test_client_lists_failed_frames_and_exits_1(tiny_onnx, camera_frames, tmp_path, capsys):
    from server.cli import main

    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "good.png"), camera_frames[0])
    cv2.imwrite(str(images / "small.png"), np.zeros((10, 10), np.uint8))
    out = tmp_path / "results.csv"
    with ServerThread(tiny_onnx) as server:
        code = main(["client", "--target", server.address, "--images", str(images), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "1 of 2 frames inspected" in err
    assert "failed small.png: camera 'cam1' frame 0: PNG image is 10x10" in err
    assert {line.split(",")[0] for line in out.read_text().splitlines()[1:]} == {"good.png"}


def test_client_reports_an_unreachable_server(camera_frames, tmp_path, capsys):
    import socket

    from server.cli import main

    write_images(tmp_path / "images", camera_frames[:1])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["client", "--target", f"127.0.0.1:{port}", "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "r.csv"), "--connect-timeout", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot reach an inspection server at 127.0.0.1:{port}" in err and "Traceback" not in err
