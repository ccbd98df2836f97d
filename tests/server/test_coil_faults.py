"""Coil tracking under faults: ``server serve`` SIGKILLed mid-coil and restarted on its database, and the
database (PostgreSQL) stopped mid-coil; the cameras stream through the camera library (resending
what was not answered). Either way the coil's records equal those of an uninterrupted run."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.server.coil_line import grey_bands_onnx, make_coil_line, record_key
from tests.server.test_cli import ServeProcess
from tests.server.test_coil_tracking import HEIGHT, WIDTH, _get_coil, _line

FRAMES = 120  # per camera: 240 frames of 32 x 128 pixels, a few seconds at the pace below
FPS = 40.0  # per camera: slow enough that a fault lands mid-coil


@pytest.fixture(scope="module")
def fault_line(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """(line folder, model, the records of an uninterrupted run through an in-process server)."""
    from tests.server.conftest import ServerThread

    root = tmp_path_factory.mktemp("coil_faults")
    folder = root / "line"
    make_coil_line(folder, frames=FRAMES, height=HEIGHT, width=WIDTH, seed=5)
    model = grey_bands_onnx(root / "model.onnx", HEIGHT, WIDTH)
    with ServerThread(model, line=_line(folder), coil_db=f"sqlite:///{root}/reference.db") as server:
        run = _stream_in_thread(server.address, folder, fps=0).result()
        (coil_id,) = run.coils.summaries
        _, records = _get_coil(server.address, coil_id)
    assert records
    return folder, model, records


class _Streaming:
    """``server client --line``'s library (:func:`client.stream_folder.run_cameras`) on its own thread."""

    def __init__(self, address: str, folder: Path, fps: float) -> None:
        from client.coil_end import coil_lengths
        from client.stream_folder import line_shots

        self.answered = 0
        self.shots = line_shots(folder)
        self._lengths = coil_lengths(folder, self.shots)
        self._address, self._fps = address, fps
        self._run = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        from client.stream_folder import run_cameras

        def count(_answer) -> None:
            self.answered += 1

        try:
            self._run = asyncio.run(run_cameras(self._address, [], shots=self.shots, coil_lengths=self._lengths,
                                                fps=self._fps, on_answer=count, give_up_s=90))
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            self._failure = exc

    def wait_for(self, answered: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while self.answered < answered:
            assert time.monotonic() < end, f"only {self.answered} frames answered"
            time.sleep(0.02)

    def result(self, timeout: float = 180.0):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the cameras did not finish"
        if self._failure is not None:
            raise self._failure
        return self._run


def _stream_in_thread(address: str, folder: Path, fps: float) -> _Streaming:
    return _Streaming(address, folder, fps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_coil(run, address: str, reference: list, frames: int) -> None:
    assert not run.unanswered and not run.failed, (run.unanswered[:3], [a.error_message for a in run.failed[:3]])
    assert not run.coils.failed, run.coils.failed
    (coil_id,) = run.coils.summaries
    summary, records = _get_coil(address, coil_id)
    assert summary.state == "closed" and summary.frames == frames  # none lost, none doubled
    assert sorted(map(record_key, records)) == sorted(map(record_key, reference))


def test_sigkill_mid_coil_loses_and_doubles_no_record(fault_line, tmp_path):
    """The server dies (SIGKILL) with frames in flight; a new one on the same port and database takes
    over; the camera library resends what was not answered and ends the coil."""
    folder, model, reference = fault_line
    port = _free_port()
    flags = ("--port", str(port), "--line", str(folder / "line.yaml"), "--coil-db", f"sqlite:///{tmp_path}/coils.db",
             "--max-batch", "4")
    server = ServeProcess(model, *flags)
    streaming = None
    try:
        streaming = _Streaming(server.address, folder, FPS)
        streaming.wait_for(2 * FRAMES // 3)
        server.process.kill()
        server.process.wait(timeout=30)
        killed_at = streaming.answered
        server = ServeProcess(model, *flags)
        run = streaming.result()
        assert killed_at < 2 * FRAMES, "the server was killed after the coil was done"
        assert run.totals().reconnects >= 1
        _assert_same_coil(run, server.address, reference, 2 * FRAMES)
    finally:
        server.process.kill()
        server.process.wait(timeout=30)


def _line_status(address: str):
    import grpc

    from protos.inspection.v1 import inspection_pb2 as pb
    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        return pb_grpc.InspectionServiceStub(channel).GetLineStatus(pb.GetLineStatusRequest(), timeout=10)


def test_postgres_down_mid_coil_spools_and_drains(fault_line, postgres_url, tmp_path):
    """PostgreSQL stops for 10 s mid-coil: frames are still answered, their components wait in the
    spool (GetLineStatus says how many), EndCoil is retried until the database is back, the spool
    drains, and the records are those of an uninterrupted run."""
    from tests.server.conftest import ServerThread

    folder, model, reference = fault_line
    url = postgres_url.new_database()
    with ServerThread(model, line=_line(folder), coil_db=url, coil_spool=tmp_path / "spool") as server:
        streaming = _Streaming(server.address, folder, fps=10.0)
        streaming.wait_for(20)
        postgres_url.stop_postgres()
        try:
            down_at, spooled, states = streaming.answered, 0, set()
            stop = time.monotonic() + 10
            while time.monotonic() < stop:
                status = _line_status(server.address).coils
                spooled = max(spooled, status.spool_frames)
                states.add(status.db_state.split(":")[0])
                time.sleep(0.25)
            answered_while_down = streaming.answered - down_at
        finally:
            postgres_url.start_postgres()
        run = streaming.result()
        _assert_same_coil(run, server.address, reference, 2 * FRAMES)
        after = _line_status(server.address).coils
    assert answered_while_down >= 50, "frames stopped being answered while the database was down"
    assert spooled > 0 and "unavailable" in states
    assert after.spool_frames == 0 and after.db_state == "ok" and after.frames_stored == 2 * FRAMES


def test_a_full_spool_makes_the_camera_resend(fault_line, postgres_url, tmp_path):
    """Database down and a spool too small for one batch: the streams end UNAVAILABLE before the
    frames' answers, the camera library resends them until the database is back, and every frame
    is answered once and stored once."""
    from tests.server.conftest import ServerThread

    folder = tmp_path / "line"
    make_coil_line(folder, frames=6, height=HEIGHT, width=WIDTH, seed=6)
    _, model, _ = fault_line
    url = postgres_url.new_database()
    with ServerThread(model, line=_line(folder), coil_db=url, coil_spool=tmp_path / "spool",
                      coil_spool_mb=1e-6) as server:
        postgres_url.stop_postgres()
        try:
            streaming = _Streaming(server.address, folder, fps=0)
            deadline = time.monotonic() + 30
            while _line_status(server.address).coils.refused_frames < 2:
                assert time.monotonic() < deadline, "no frame was refused"
                time.sleep(0.1)
            assert streaming.answered == 0
        finally:
            postgres_url.start_postgres()
        run = streaming.result()
        assert not run.unanswered and not run.failed and len(run.answers) == 12
        assert run.totals().reconnects >= 1 and run.totals().duplicates == 0
        (coil_id,) = run.coils.summaries
        summary, _ = _get_coil(server.address, coil_id)
    assert summary.frames == 12


def test_replicas_behind_nginx_build_one_coil_in_one_postgresql(fault_line, postgres_url, tmp_path):
    """The balanced set-up (nginx + 3 ``server serve`` replicas, deploy/balanced.py) writing one
    PostgreSQL database; a replica drained (SIGTERM) mid-coil moves its camera to another. The coil
    is built from frames several replicas stored, and its records are an uninterrupted run's."""
    from deploy.balanced import BalancedSetup, free_port, nginx_missing_reason
    from tests.server.conftest import scrape

    if (reason := nginx_missing_reason()) is not None:
        pytest.skip(reason)
    folder, model, reference = fault_line
    url = postgres_url.new_database()
    metrics = [free_port() for _ in range(3)]
    setup = BalancedSetup(model, tmp_path, metrics_ports=metrics, flags=(
        "--device", "cpu", "--threads", "1", "--line", str(folder / "line.yaml"), "--coil-db", url))
    for n, replica in enumerate(setup.replicas):
        replica.flags += ["--coil-spool", str(tmp_path / f"spool{n}")]  # a spool per replica
    with setup:
        streaming = _Streaming(setup.target, folder, fps=20.0)
        streaming.wait_for(FRAMES // 2)
        stored = {n: scrape(port).get(("inspection_coil_frames_stored_total", ()), 0) for n, port in enumerate(metrics)}
        busiest = max(stored, key=stored.get)
        setup.replicas[busiest].process.send_signal(signal.SIGTERM)  # drains: its cameras resend to the others
        run = streaming.result()
        after = {n: scrape(port).get(("inspection_coil_frames_stored_total", ()), 0)
                 for n, port in enumerate(metrics) if n != busiest}
        _assert_same_coil(run, setup.target, reference, 2 * FRAMES)
    assert stored[busiest] > 0 and sum(after.values()) > sum(v for n, v in stored.items() if n != busiest)
