"""The ModelControl service and who may use it: mutual TLS with real certificates, the admin token,
loopback-only management, and ``server models`` against a ``server serve --model-repo`` process."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from server.auth import AdminPolicy, is_loopback_peer
from server.model_repo import STATE_FILE
from server.models_cli import call, credentials
from tests.server.certs import CertificateAuthority
from tests.server.model_repos import repo_of, repo_server
from tests.server.test_service import make_request


@pytest.fixture
def two_versions(tmp_path: Path, defect_onnx: Path) -> Path:
    """A repository of two copies of the defect model, production "1"."""
    root = repo_of(tmp_path / "repo", {"1": defect_onnx, "2": defect_onnx})
    (root / STATE_FILE).write_text(json.dumps({"production": "1", "candidate": None, "history": []}))
    return root


async def inspect_one(target: str, creds: grpc.ChannelCredentials | None, frame: np.ndarray):
    channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
    async with channel:
        return await pb_grpc.InspectionServiceStub(channel).InspectOne(make_request("cam0", 0, frame, "gray8"),
                                                                      timeout=10)


def test_mutual_tls_roles(tmp_path: Path, two_versions: Path, camera_frames: np.ndarray) -> None:
    ca = CertificateAuthority(tmp_path)
    server_cert, camera, admin = ca.issue("127.0.0.1", server=True), ca.issue("camera-1"), ca.issue("ops-admin")
    (tmp_path / "other").mkdir()
    stranger = CertificateAuthority(tmp_path / "other", "Other CA").issue("ops-admin")
    policy = AdminPolicy(subjects=frozenset({"ops-admin"}))
    tls = {"tls_cert": server_cert.cert, "tls_key": server_cert.key, "tls_client_ca": ca.files.cert}

    async def main() -> None:
        async with repo_server(two_versions, policy=policy, **tls) as (server, _):
            target = f"localhost:{server.port}"
            anonymous = credentials(ca.files.cert, None, None)
            as_camera = credentials(ca.files.cert, camera.cert, camera.key)
            as_admin = credentials(ca.files.cert, admin.cert, admin.key)
            as_stranger = credentials(ca.files.cert, stranger.cert, stranger.key)
            for creds in (anonymous, as_stranger):  # no certificate, or one the client CA did not sign
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await inspect_one(target, creds, camera_frames[0])
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (await inspect_one(target, as_camera, camera_frames[0])).model_version == "1"
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call(target, "promote", "2", credentials=as_camera)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "camera-1" in denied.value.details()
            promoted = await call(target, "promote", "2", credentials=as_admin)
            assert promoted.production == "2" and list(promoted.history) == ["1"]
            assert (await inspect_one(target, as_camera, camera_frames[0])).model_version == "2"
            audit = await call(target, "audit", credentials=as_admin, last=1)
            assert [(e.action, e.version, e.outcome) for e in audit.entries] == [("promote", "2", "ok")]
            assert "ops-admin" in audit.entries[0].who

    asyncio.run(main())


def test_admin_token(tmp_path: Path, two_versions: Path) -> None:
    policy = AdminPolicy(token=b"s3cret-token")

    async def main() -> None:
        async with repo_server(two_versions, policy=policy, bind="127.0.0.1") as (server, _):
            for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("s3cret-tokeX", grpc.StatusCode.PERMISSION_DENIED)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(server.address, "rollback", token=token)
                assert refused.value.code() == code
            loaded = await call(server.address, "load", "2", token="s3cret-token")
            assert loaded.candidate == "2" and [(v.version, v.role, v.loaded) for v in loaded.versions] == [
                ("1", "production", True), ("2", "candidate", True)]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(server.address, "unload", "1", token="s3cret-token")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "never unloaded" in refused.value.details()
            assert (await call(server.address, "unload", "2", token="s3cret-token")).candidate == ""

    asyncio.run(main())


def _outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, None without one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_without_an_admin_role_management_is_loopback_only(two_versions: Path) -> None:
    # The peer strings grpc.aio reports (it percent-encodes IPv6 brackets).
    for peer in ("ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000", "ipv6:[::1]:5000", "ipv6:%5B::ffff:127.0.0.1%5D:5000",
                 "unix:/run/strip.sock"):
        assert is_loopback_peer(peer), peer
    for peer in ("ipv4:192.0.2.7:5000", "ipv6:%5Bfd00::2%5D:5000", "ipv6:%5B::ffff:192.0.2.7%5D:5000", "dns:x:1", ""):
        assert not is_loopback_peer(peer), peer
    outside = _outside_address()

    async def main() -> None:
        async with repo_server(two_versions, policy=AdminPolicy(), bind="0.0.0.0") as (server, _):
            assert (await call(f"127.0.0.1:{server.port}", "list")).production == "1"
            if outside is None:
                pytest.skip("this machine has no address but loopback")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(f"{outside}:{server.port}", "promote", "2")
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "loopback" in refused.value.details()

    asyncio.run(main())


def test_server_models_commands_against_a_serve_process(tmp_path: Path, two_versions: Path, capsys) -> None:
    from server.cli import main
    from tests.server.test_cli import ServeProcess

    (tmp_path / "token").write_text("tok\n")
    (two_versions / "3").mkdir()
    (two_versions / "3" / "model.onnx").write_bytes(b"corrupt")
    server = ServeProcess(None, "--model-repo", str(two_versions), "--admin-token-file", str(tmp_path / "token"))
    try:
        token = ["--token-file", str(tmp_path / "token")]
        assert main(["models", "promote", "2", "--target", server.address, *token]) == 0
        assert "production 2; candidate none; rollback to 1" in capsys.readouterr().out
        assert main(["models", "load", "3", "--target", server.address, *token]) == 2
        assert "FAILED_PRECONDITION: loading version '3' (model.onnx) failed" in capsys.readouterr().err
        assert main(["models", "rollback", "--target", server.address, *token]) == 0
        assert main(["models", "audit", "--target", server.address, *token]) == 0
        out = capsys.readouterr().out
        assert [line.split()[1:4] for line in out.splitlines()[-3:]] == [
            ["promote", "2", "ok"], ["load", "3", "failed"], ["rollback", "1", "ok"]]
        assert main(["models", "list", "--target", server.address, "--token-file", str(tmp_path / "token")]) == 0
    finally:
        server.process.terminate()
        server.process.wait(timeout=60)
    assert "event=management_access management (ModelControl) needs the bearer token" in server.log
    assert json.loads((two_versions / STATE_FILE).read_text())["production"] == "1"
