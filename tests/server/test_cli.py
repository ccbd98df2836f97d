"""``server serve`` as a real process (the ``server client`` tests are in ``tests/client``)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc

from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from tests.server.test_service import assert_equals_direct, make_request

REPO = Path(__file__).resolve().parents[2]


class ServeProcess:
    """``server serve`` as a real process on a free port, its log collected by a reader thread
    (``model`` None: the flags name what to serve, e.g. ``--model-repo DIR``)."""

    def __init__(self, model: Path | None, *flags: str, **popen) -> None:
        serves = ["--model", str(model)] if model is not None else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", *serves, "--port", "0",
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


def test_serve_runs_the_int8_ir_it_is_pointed_to_and_says_why(tiny_int8: Path, tmp_path: Path, capsys):
    """--int8-ir PATH runs that IR in place of the graph (any CPU); auto leaves it where the CPU may not
    use it (the tests run with STRIP_CPU_INT8=0); a path that is not this graph's IR is refused."""
    from engine.backends.int8 import int8_ir_path
    from server.cli import main

    ir = int8_ir_path(tiny_int8)
    server = ServeProcess(tiny_int8, "--int8-ir", str(ir))
    try:
        assert "event=backend_choice backend=openvino reason='openvino int8 IR model.int8.xml (pointed to;" in server.log
        assert re.search(r"event=ready .*backend=openvino device=cpu precision=int8", server.log), server.log
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    server = ServeProcess(tiny_int8)
    try:
        assert "model.int8.xml not used: int8 switched off by STRIP_CPU_INT8=0" in server.log
        # not int8: fp32, or bf16 where the tests are run with STRIP_CPU_BF16=1
        assert re.search(r"event=ready .*precision=(fp32|bf16) ", server.log), server.log
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    other = tmp_path / "other.int8.xml"
    assert main(["serve", "--model", str(tiny_int8), "--int8-ir", str(other), "--port", "0", "--metrics-port", "-1"]) == 2
    assert f"server serve: error: int8 IR {other}: {other}: no such file" in capsys.readouterr().err
