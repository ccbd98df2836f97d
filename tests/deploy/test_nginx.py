"""The shipped nginx config: rendered by the same step the balanced set-up uses, checked by nginx
itself, and balancing real gRPC calls per call over real replicas."""

from __future__ import annotations

import re
import subprocess

import grpc
import pytest

from deploy.balanced import (
    NGINX_CONF,
    REPLICAS,
    BalancedSetup,
    Balancer,
    find_nginx,
    nginx_missing_reason,
    render,
)

needs_nginx = pytest.mark.skipif(nginx_missing_reason() is not None, reason=str(nginx_missing_reason()))


def values(port: int = 50050) -> dict[str, str]:
    return {"LISTEN": f"127.0.0.1:{port}", **{f"REPLICA_{i + 1}": f"127.0.0.1:{port + 1 + i}" for i in range(REPLICAS)}}


def test_render_fills_placeholders_and_leaves_nginx_variables():
    text = render(NGINX_CONF.read_text(), values())
    assert "${" not in text
    assert "listen 127.0.0.1:50050 http2;" in text
    assert "$upstream_addr" in text and "$request_time" in text  # nginx's own variables untouched
    for port in (50051, 50052, 50053):
        assert re.search(rf"server 127\.0\.0\.1:{port} max_fails=\d+ fail_timeout=\d+s;", text)
    with pytest.raises(KeyError, match="no value for REPLICA_3"):
        render(NGINX_CONF.read_text(), {k: v for k, v in values().items() if k != "REPLICA_3"})
    with pytest.raises(KeyError, match="no EXTRA"):
        render(NGINX_CONF.read_text(), {**values(), "EXTRA": "x"})


def test_config_has_what_grpc_balancing_needs():
    text = NGINX_CONF.read_text()
    directives = {line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}
    assert {"grpc_pass", "grpc_next_upstream", "keepalive", "upstream", "client_max_body_size"} <= directives
    next_upstream = re.search(r"^\s*grpc_next_upstream (.+);", text, re.M).group(1).split()
    assert {"error", "timeout", "non_idempotent"} <= set(next_upstream)  # gRPC calls are POSTs


@needs_nginx
def test_nginx_accepts_the_rendered_config(tmp_path):
    (tmp_path / "tmp").mkdir()
    conf = tmp_path / NGINX_CONF.name
    conf.write_text(render(NGINX_CONF.read_text(), values()))
    check = subprocess.run([find_nginx(), "-t", "-p", str(tmp_path), "-c", conf.name, "-g", "daemon off;"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "syntax is ok" in check.stderr


@needs_nginx
def test_calls_are_balanced_per_call_and_a_dead_replica_is_skipped(tiny_onnx, tmp_path, tiny_frames):
    from protos.inspection.v1 import inspection_pb2 as pb
    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
    from tests.server.test_service import make_request

    with BalancedSetup(tiny_onnx, tmp_path, flags=("--device", "cpu", "--threads", "1")) as setup:
        addresses = {r.address for r in setup.replicas}

        def upstreams() -> list[str]:
            lines = (tmp_path / "nginx" / "access.log").read_text().splitlines()
            return [line.split("upstream=")[1].split()[0] for line in lines if "InspectOne" in line]

        with grpc.insecure_channel(setup.target) as channel:  # ONE connection to nginx
            stub = pb_grpc.InspectionServiceStub(channel)
            for i in range(6):
                answer = stub.InspectOne(make_request("cam0", i, tiny_frames[i]), timeout=30)
                assert not answer.HasField("error")
            assert set(upstreams()) == addresses  # per call, not per connection
            setup.replicas[1].kill()
            before = len(upstreams())
            for i in range(6):  # nginx retries the refused connection on the next replica
                assert stub.InspectOne(make_request("cam0", i, tiny_frames[i]), timeout=30).frame_id == i
            tried = upstreams()[before:]
            assert any(setup.replicas[1].address in entry for entry in tried), tried  # tried once, then out
            assert pb.InspectResponse  # the import is the proto the balancer carries
    assert all(r.process.returncode in (0, -9) for r in setup.replicas)


def test_balancer_needs_three_replicas(tmp_path):
    with pytest.raises(ValueError, match="balances 3 replicas"):
        Balancer(["127.0.0.1:1"], 2, tmp_path)


@needs_nginx
def test_the_one_command_set_up_serves_and_drains_on_sigterm(tiny_onnx, tmp_path, tiny_frames):
    """``python -m deploy.balanced`` (what ``make balanced`` runs) as a real process."""
    import signal
    import sys

    from deploy.balanced import REPO, free_port, wait_for_port
    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
    from tests.server.test_service import make_request

    port, replicas, metrics = free_port(), [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    process = subprocess.Popen(
        [sys.executable, "-m", "deploy.balanced", "--model", str(tiny_onnx), "--port", str(port),
         "--replica-ports", ",".join(map(str, replicas)), "--metrics-ports", ",".join(map(str, metrics)),
         "--workdir", str(tmp_path), "--device", "cpu", "--threads", "1"],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, 120, "the balanced set-up")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = pb_grpc.InspectionServiceStub(channel).InspectOne(make_request("cam0", 7, tiny_frames[0]),
                                                                      timeout=30)
        assert answer.frame_id == 7 and not answer.HasField("error")
        for metrics_port in metrics:  # every replica's /metrics is where the local scrape config looks
            wait_for_port(metrics_port, 10, "a replica's /metrics")
        process.send_signal(signal.SIGTERM)
        err = process.communicate(timeout=90)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert f"balancer 127.0.0.1:{port} -> replicas" in err and "replicas exited with 0, 0, 0" in err
