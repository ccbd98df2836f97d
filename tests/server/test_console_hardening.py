"""Issue 24's hostile and sleepy console clients, with raw sockets and real HTTP on 127.0.0.1: a viewer
that stops reading at SIGTERM, connections that never finish a request (2,000 of them against a
server limited to 1,024 open files), ``/api/state`` hammered while frames stream, a frame number of
5,000 digits, and more cameras than the console shows."""

from __future__ import annotations

import asyncio
import re
import resource
import signal
import socket
import threading
import time

import aiohttp
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from server.console import Console, ConsoleConfig
from tests.server.conftest import running_server, wait_until
from tests.server.test_cli import ServeProcess
from tests.server.test_service import make_request

PARTIAL_REQUEST = b"GET / HTTP/1.1\r\nHost: console\r\nUser-Agent: slow"  # never ends its headers


def console_port(server: ServeProcess) -> int:
    deadline = time.monotonic() + 30
    while (match := re.search(r"event=console_start url=\S+:(\d+)/", server.log)) is None:
        assert time.monotonic() < deadline, server.log
        time.sleep(0.05)
    return int(match.group(1))


def stream_cameras(address: str, frames: np.ndarray, cameras: list[str], stop: threading.Event) -> list:
    """One Inspect stream whose frames cycle through ``cameras`` until ``stop``; returns its answers."""
    def requests():
        i = 0
        while not stop.is_set():
            yield make_request(cameras[i % len(cameras)], i, frames[i % len(frames)], "gray8")
            i += 1

    answers: list = []
    with grpc.insecure_channel(address) as channel:
        try:
            answers.extend(pb_grpc.InspectionServiceStub(channel).Inspect(requests(), timeout=300))
        except grpc.RpcError as exc:  # the server drained (SIGTERM)
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    return answers


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Reads (and drops) what ``sock`` receives until the peer closes it; False if still open after ``timeout``."""
    sock.settimeout(timeout)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if not sock.recv(1 << 16):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


# --------------------------------------------------------------------------- 1. SIGTERM with a stalled viewer


def send_queue(local_port: int, remote_port: int) -> int | None:
    """Bytes the kernel holds unsent on the TCP socket 127.0.0.1:``local_port`` -> ``remote_port``
    (``/proc/net/tcp``'s tx_queue), None when there is no such socket."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
        if int(local, 16) == local_port and int(remote, 16) == remote_port:
            return int(fields[4].split(":")[0], 16)
    return None


def test_sigterm_with_a_viewer_that_stopped_reading_exits_0_and_closes_it(tiny_onnx, camera_frames):
    # A viewer that never reads: once the kernel's buffers are full its event writes block, and the
    # next state fills its one-slot queue. stop() used to put_nowait(None) into that full queue:
    # QueueFull, exit 1 (the frame drain itself completed).
    server = ServeProcess(tiny_onnx, "--console-port", "0")
    cameras = [f"camera-{n:02d}-".ljust(256, "x") for n in range(64)]  # 64 cameras, longest ids: large states
    viewer = socket.socket()
    try:
        port = console_port(server)
        viewer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        viewer.connect(("127.0.0.1", port))
        viewer.sendall(b"GET /events HTTP/1.1\r\nHost: console\r\n\r\n")
        with grpc.insecure_channel(server.address) as channel:
            list(pb_grpc.InspectionServiceStub(channel).Inspect(
                make_request(camera, i, camera_frames[i % 50], "gray8") for i, camera in enumerate(cameras)))
        # The server's send buffer grows (autotuned, up to a few MiB) until it is full: then writes block.
        queued, steady_since, deadline = -1, time.monotonic(), time.monotonic() + 150
        while time.monotonic() - steady_since < 3:
            assert time.monotonic() < deadline, "the viewer's connection never filled"
            time.sleep(0.5)
            now = send_queue(port, viewer.getsockname()[1])
            assert now is not None, "the viewer's connection is gone"
            if now != queued:
                queued, steady_since = now, time.monotonic()
        assert queued > 100_000
        server.process.send_signal(signal.SIGTERM)
        returncode = server.process.wait(timeout=60)
        viewer_closed = closed_by_peer(viewer, 10)
    finally:
        viewer.close()
        if server.process.poll() is None:
            server.process.kill()
    assert returncode == 0, server.log[-5000:]
    assert "Traceback" not in server.log and "QueueFull" not in server.log
    assert viewer_closed, "the stalled viewer's connection was left open"
    assert "event=console_viewer_close viewers=0" in server.log


# --------------------------------------------------------------------------- 3. connections that never finish


def test_2000_stalled_console_connections_leave_cameras_and_health_served(tiny_onnx, camera_frames):
    def limit_open_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2300:
        pytest.skip(f"this process may hold at most {hard} open files; the test needs 2,300")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = ServeProcess(tiny_onnx, "--console-port", "0", preexec_fn=limit_open_files)
    stalled: list[socket.socket] = []
    try:
        port = console_port(server)
        for _ in range(2000):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            stalled.append(sock)
        time.sleep(1.0)
        for sock in stalled:
            try:
                sock.send(PARTIAL_REQUEST)
            except OSError:
                pass  # already closed by the server (over its connection bound)
        time.sleep(2.0)
        log_before = len(server.log)
        with grpc.insecure_channel(server.address) as channel:
            answers = list(pb_grpc.InspectionServiceStub(channel).Inspect(
                (make_request("cam0", i, camera_frames[i], "gray8") for i in range(20)), timeout=20))
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert [a.frame_id for a in answers] == list(range(20)) and not any(a.HasField("error") for a in answers)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # The stalled connections the console took are closed by its header timeout (10 s): then it
        # serves a new client again.
        time.sleep(11)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as fresh:
            fresh.sendall(b"GET / HTTP/1.1\r\nHost: console\r\nConnection: close\r\n\r\n")
            page = b""
            while chunk := fresh.recv(1 << 16):
                page += chunk
        assert page.startswith(b"HTTP/1.1 200") and b"Strip inspection console" in page
        server.process.send_signal(signal.SIGTERM)
        returncode = server.process.wait(timeout=60)
    finally:
        for sock in stalled:
            sock.close()
        if server.process.poll() is None:
            server.process.kill()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    log = server.log
    assert returncode == 0, log[-3000:]
    assert "Traceback" not in log and "accept()" not in log and "Too many open files" not in log, log[-3000:]
    assert len(log) - log_before < 20_000  # no flood while the cameras were served
    assert log.count("event=console_connections_full") == 1


def test_header_and_idle_timeouts_and_the_connection_bound(tiny_onnx):
    config = ConsoleConfig(port=0, refresh_hz=10, max_connections=5, header_timeout_s=0.5, idle_timeout_s=1.0)

    async def main():
        async with running_server(tiny_onnx) as server:
            console = Console(server, config)
            await console.start()
            try:
                return await asyncio.to_thread(clients, console.port), console.connections.refused, \
                    console.connections.timed_out
            finally:
                await console.stop()

    def clients(port: int):
        partial = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for sock in partial:
            sock.sendall(PARTIAL_REQUEST)
        keep_alive = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.1)
        over_bound = socket.create_connection(("127.0.0.1", port))
        refused_at_once = closed_by_peer(over_bound, 0.3)
        keep_alive.sendall(b"GET / HTTP/1.1\r\nHost: console\r\n\r\n")
        keep_alive.settimeout(5)
        first = keep_alive.recv(1 << 16)
        started = time.monotonic()
        partial_closed = [closed_by_peer(sock, 3) for sock in partial]
        idle_closed = closed_by_peer(keep_alive, 5)
        idle_s = time.monotonic() - started
        for sock in (*partial, keep_alive, over_bound):
            sock.close()
        return refused_at_once, first, partial_closed, idle_closed, idle_s

    (refused_at_once, first, partial_closed, idle_closed, idle_s), refused, timed_out = asyncio.run(main())
    assert refused_at_once and refused == 1
    assert first.startswith(b"HTTP/1.1 200")  # a complete request within the timeout is answered
    assert all(partial_closed), partial_closed
    assert idle_closed and 0.5 < idle_s < 4, idle_s
    assert timed_out >= 4  # the partial requests (aiohttp may close the idle one first, same timeout)


def test_a_viewer_that_reads_outlives_the_idle_timeout(tiny_onnx):
    async def main():
        async with running_server(tiny_onnx) as server:
            console = Console(server, ConsoleConfig(port=0, refresh_hz=10, idle_timeout_s=0.5, header_timeout_s=0.5))
            await console.start()
            try:
                states = 0
                async with aiohttp.ClientSession() as session, session.get(console.url + "events") as response:
                    started = time.monotonic()
                    async for line in response.content:
                        states += line.startswith(b"data: ")
                        if time.monotonic() - started > 2.0:
                            break
                return states
            finally:
                await console.stop()

    assert asyncio.run(main()) >= 10  # 2 s at 10 states a second, never cut by the 0.5 s idle timeout


# --------------------------------------------------------------------------- 4. the encoding budget


def test_api_state_and_image_requests_keep_the_encoding_budget(tiny_onnx, camera_frames):
    async def main():
        async with running_server(tiny_onnx, max_batch=8) as server:
            console = Console(server, ConsoleConfig(port=0, refresh_hz=2, encodes_per_s=4))
            await console.start()
            stop = threading.Event()
            streamer = asyncio.ensure_future(asyncio.to_thread(
                stream_cameras, server.address, camera_frames, [f"cam{k}" for k in range(8)], stop))
            try:
                await wait_until(lambda: console.buffer.cameras, what="the first frames")
                async with aiohttp.ClientSession() as session:
                    return await hammer(session, console)
            finally:
                stop.set()
                await streamer
                await console.stop()

    async def hammer(session, console):
        base = console.url.rstrip("/")
        started, encoded_before = time.monotonic(), console.encoded
        states, images = [], {}
        while time.monotonic() - started < 4.0:
            async with session.get(base + "/api/state") as response:
                states.append(await response.json())
            newest = max(s.seq for s in console.buffer.retained())
            for seq in range(newest - 3, newest + 1):  # frames the console keeps and has not drawn
                for kind in ("frames", "thumbs"):
                    async with session.get(f"{base}/{kind}/{seq}.jpg") as response:
                        images[response.status] = images.get(response.status, 0) + 1
        return states, images, console.encoded - encoded_before, time.monotonic() - started

    states, images, encoded, elapsed = asyncio.run(main())
    # At most 4 a second over all cameras, whatever the clients ask (+2: one tick's budget at each end).
    assert encoded <= 4 * elapsed + 2, (encoded, elapsed, len(states))
    assert len(states) > 20 and all(len(s["cameras"]) == 8 for s in states[-5:])
    assert images.get(404, 0) > 0 and set(images) <= {200, 404}


# --------------------------------------------------------------------------- 6. a frame number too long to be one


def test_a_frame_number_of_5000_digits_is_404_without_a_traceback(tiny_onnx, caplog):
    async def main():
        async with running_server(tiny_onnx) as server:
            console = Console(server, ConsoleConfig(port=0))
            await console.start()
            try:
                statuses = []
                async with aiohttp.ClientSession() as session:
                    for kind in ("frames", "thumbs"):
                        async with session.get(f"{console.url}{kind}/{'9' * 5000}.jpg") as response:
                            statuses.append(response.status)
                return statuses
            finally:
                await console.stop()

    assert asyncio.run(main()) == [404, 404]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]


# --------------------------------------------------------------------------- 5. more cameras than the console shows


def test_a_new_camera_takes_the_place_of_the_least_recently_seen(tiny_onnx, camera_frames):
    async def main():
        async with running_server(tiny_onnx) as server:
            console = Console(server, ConsoleConfig(port=0, refresh_hz=10, max_cameras=3))
            await console.start()
            try:
                seen = []
                async with aiohttp.ClientSession() as session:
                    for camera in ("old-a", "old-b", "old-c", "new-d", "old-a"):
                        await asyncio.to_thread(stream_once, server.address, camera, camera_frames[:2])
                        await asyncio.sleep(0.3)
                        async with session.get(console.url + "api/state") as response:
                            state = await response.json()
                        seen.append(([c["id"] for c in state["cameras"]], state["cameras_not_shown"]))
                return seen
            finally:
                await console.stop()

    def stream_once(address, camera, frames):
        with grpc.insecure_channel(address) as channel:
            return list(pb_grpc.InspectionServiceStub(channel).Inspect(
                make_request(camera, i, f, "gray8") for i, f in enumerate(frames)))

    seen = asyncio.run(main())
    assert [cameras for cameras, _ in seen[2:]] == [
        ["old-a", "old-b", "old-c"],
        ["old-b", "old-c", "new-d"],  # old-a, seen least recently, made room
        ["old-c", "new-d", "old-a"],  # old-a is back, old-b is not shown
    ]
    assert [not_shown for _, not_shown in seen[2:]] == [0, 1, 1]
