"""The OPC UA server with a real asyncua client on loopback: browse the line, watch the open coil's
counters change while a simulated coil streams, receive the roll-mark alarm, acknowledge it (stored
in the database with the session's user), end the coil with the method node; anonymous access refused
unless asked for; certificate users: a trusted certificate connects, an untrusted one is refused."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from pathlib import Path

import pytest
from asyncua import Client, ua

from server.opcua import NAMESPACE
from tests.server.conftest import ServerThread
from tests.server.test_coil_tracking import _inspect, _line, _requests, coil_folder, coil_model  # noqa: F401

RULES = """
grades:
  - {name: A, max_periodic: {all: 0}}
  - {name: B}
alarms:
  - {name: roll-mark, kind: periodic, severity: 800}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Handler:
    """What the subscription delivers: (time, value) of the watched counter, and the alarm events."""

    def __init__(self) -> None:
        self.values: list[tuple[float, int]] = []
        self.events: list[tuple[float, object]] = []

    def datachange_notification(self, node, value, data) -> None:
        self.values.append((time.monotonic(), value))

    def event_notification(self, event) -> None:
        self.events.append((time.monotonic(), event))


async def stream(address: str, folder: Path) -> list[float]:
    """Streams the coil in 10 parts 0.2 s apart, without EndCoil; returns when each part's last answer came."""
    import grpc

    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

    requests = sorted(_requests(folder), key=lambda r: (r.position_mm, r.camera_id))  # as the strip passes
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InspectionServiceStub(channel)
        answered = []
        for part in range(10):
            await _inspect(stub, requests[part * len(requests) // 10:(part + 1) * len(requests) // 10])
            answered.append(time.monotonic())
            await asyncio.sleep(0.2)
    return answered


@pytest.fixture
def opcua_server(coil_model, coil_folder, tmp_path):  # noqa: F811
    (tmp_path / "rules.yaml").write_text(RULES)
    (tmp_path / "users").write_text("# OPC UA users\noperator:s3cret\n")
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}"
    with ServerThread(coil_model, line=_line(coil_folder), coil_db=f"sqlite:///{tmp_path}/coils.db",
                      grading=tmp_path / "rules.yaml", opcua_endpoint=endpoint,
                      opcua_users=tmp_path / "users") as server:
        yield server, endpoint


def test_a_plc_watches_the_coil_acknowledges_the_roll_mark_and_ends_the_coil(opcua_server, coil_folder):  # noqa: F811
    server, endpoint = opcua_server
    found = asyncio.run(_session(server, endpoint, coil_folder))
    names, handler, answered, ended, closed, stored = found
    assert {"ServingState", "ModelVersion", "FramesPerSecond", "Cameras", "OpenCoil", "LastClosedCoil", "Alarms",
            "EndCoil"} <= names
    counts = [v for _, v in handler.values]
    counts = counts[:counts.index(400) + 1]
    assert len(set(counts)) >= 3 and counts == sorted(counts)  # it grew while streaming, part by part
    raised = [(t, e) for t, e in handler.events if e.ConditionName == "roll-mark"]
    first_at, alarm = raised[0]
    assert alarm.Severity == 800 and "repeats every" in alarm.Message.Text and "roll work-roll" in alarm.Message.Text
    # The first two parts (80 frames, 640 mm along) hold 10 turns of the roll: the alarm comes within 2 s
    # of their answers, while the coil still streams.
    assert first_at - answered[1] < 2.0 and first_at < answered[-1]
    acked = [e for _, e in raised if e.AckedState.Text == "Acknowledged"]
    assert acked and acked[0].Retain is False
    assert ended[0] == "closed" and ended[1] > 0 and ended[2] == "B"
    assert closed == ("coil-0-000", "B")
    assert stored.acknowledged_by == "opcua:operator" and stored.rule == "roll-mark"  # the session's user


async def _session(server, endpoint: str, folder: Path):
    client = Client(endpoint)
    client.set_user("operator")
    client.set_password("s3cret")
    async with client:
        idx = await client.get_namespace_index(NAMESPACE)
        line = await client.nodes.objects.get_child([f"{idx}:Line"])
        names = {(await c.read_browse_name()).Name for c in await line.get_children()}
        frames = await line.get_child([f"{idx}:OpenCoil", f"{idx}:Frames"])
        alarms = await line.get_child([f"{idx}:Alarms"])
        handler = Handler()
        subscription = await client.create_subscription(50, handler)
        await subscription.subscribe_data_change(frames)
        await subscription.subscribe_events(alarms, ua.ObjectIds.AlarmConditionType)
        answered = await stream(server.address, folder)
        await _until(lambda: any(e.ConditionName == "roll-mark" for _, e in handler.events), 5)
        await _until(lambda: handler.values and handler.values[-1][1] == 400, 5, lambda: handler.values)
        event = next(e for _, e in handler.events if e.ConditionName == "roll-mark")
        await alarms.call_method(ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
                                 ua.Variant(event.EventId, ua.VariantType.ByteString),
                                 ua.Variant(ua.LocalizedText("seen"), ua.VariantType.LocalizedText))
        await _until(lambda: any(e.AckedState.Text == "Acknowledged" for _, e in handler.events), 5)
        ended = await line.call_method(f"{idx}:EndCoil", ua.Variant("coil-0-000", ua.VariantType.String),
                                       ua.Variant(0.0, ua.VariantType.Double))
        closed_id = await line.get_child([f"{idx}:LastClosedCoil", f"{idx}:CoilId"])
        closed_grade = await line.get_child([f"{idx}:LastClosedCoil", f"{idx}:Grade"])
        await _until_value(closed_id, "coil-0-000", 5)
        closed = (await closed_id.read_value(), await closed_grade.read_value())
        await _until_value(await line.get_child([f"{idx}:OpenCoil", f"{idx}:CoilId"]), "", 5)  # none open now
    stored = server.line_actions.book._store.recent(10)[0]
    return names, handler, answered, ended, closed, stored


async def _until(condition, timeout_s: float, state=lambda: None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {state()}"
        await asyncio.sleep(0.05)


async def _until_value(node, value, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await node.read_value() != value:
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def test_anonymous_and_wrong_passwords_are_refused(opcua_server):
    _, endpoint = opcua_server

    async def connect(user: str | None, password: str | None) -> None:
        client = Client(endpoint)
        if user is not None:
            client.set_user(user)
            client.set_password(password)
        async with client:
            pass

    for user, password in ((None, None), ("operator", "wrong"), ("nobody", "s3cret")):
        with pytest.raises(Exception):  # noqa: B017, PT011 - asyncua raises its status as several types
            asyncio.run(connect(user, password))


def _certificate(folder: Path, name: str, uri: str, usage) -> tuple[Path, Path]:
    """A self-signed application certificate (DER) and its key (PEM), as OPC UA wants them."""
    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = generate_private_key()
    certificate = generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")], [usage])
    cert_file, key_file = folder / f"{name}.der", folder / f"{name}.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    key_file.write_bytes(dump_private_key_as_pem(key))
    return cert_file, key_file


def test_with_a_certificate_the_endpoint_is_encrypted_only(coil_model, coil_folder, tmp_path):  # noqa: F811
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from server.opcua import APPLICATION_URI

    server_cert, server_key = _certificate(tmp_path, "server", APPLICATION_URI, ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = _certificate(tmp_path, "client", "urn:test:plc", ExtendedKeyUsageOID.CLIENT_AUTH)
    (tmp_path / "users").write_text("operator:sha256:" + hashlib.sha256(b"s3cret").hexdigest() + "\n")
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}"

    async def read_state(secure: bool) -> str:
        client = Client(endpoint)
        client.application_uri = "urn:test:plc"
        client.set_user("operator")
        client.set_password("s3cret")
        if secure:
            await client.set_security(SecurityPolicyBasic256Sha256, str(client_cert), str(client_key),
                                      server_certificate=str(server_cert))
        async with client:
            idx = await client.get_namespace_index(NAMESPACE)
            state = await client.nodes.objects.get_child([f"{idx}:Line", f"{idx}:ServingState"])
            await _until_value(state, "serving", 5)  # written twice a second
            return await state.read_value()

    with ServerThread(coil_model, line=_line(coil_folder), opcua_endpoint=endpoint, opcua_users=tmp_path / "users",
                      opcua_cert=server_cert, opcua_key=server_key):
        assert asyncio.run(read_state(secure=True)) == "serving"
        with pytest.raises(Exception):  # noqa: B017, PT011 - no unencrypted endpoint to connect to
            asyncio.run(read_state(secure=False))


def test_certificate_users_a_trusted_certificate_connects_an_untrusted_one_is_refused(
        coil_model, coil_folder, tmp_path):  # noqa: F811
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from coils.alarms import Alarm
    from server.opcua import APPLICATION_URI

    server_cert, server_key = _certificate(tmp_path, "server", APPLICATION_URI, ExtendedKeyUsageOID.SERVER_AUTH)
    plc = _certificate(tmp_path, "plc", "urn:test:plc", ExtendedKeyUsageOID.CLIENT_AUTH)
    intruder = _certificate(tmp_path, "intruder", "urn:test:intruder", ExtendedKeyUsageOID.CLIENT_AUTH)
    (tmp_path / "trusted").mkdir()
    (tmp_path / "trusted" / "plc.der").write_bytes(plc[0].read_bytes())
    (tmp_path / "users").write_text("operator:s3cret\n")
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}"
    with ServerThread(coil_model, line=_line(coil_folder), coil_db=f"sqlite:///{tmp_path}/coils.db",
                      opcua_endpoint=endpoint, opcua_users=tmp_path / "users", opcua_cert=server_cert,
                      opcua_key=server_key, opcua_trusted_certs=tmp_path / "trusted") as server:
        book = server.line_actions.book
        alarm = book.raise_alarm(Alarm(0, "manual", "periodic", 500, "coil-1", "cam-0", 10.0, "a test", time.time()))
        # Logged in by its trusted certificate, no password: the acknowledgement names the certificate's CN.
        assert asyncio.run(_acknowledge_as(endpoint, server_cert, plc, plc, None, alarm.alarm_id)) is True
        assert book._store.recent(10)[0].acknowledged_by == "opcua:plc"
        # A trusted application with a password user connects as that user.
        assert asyncio.run(_acknowledge_as(endpoint, server_cert, plc, None, "s3cret", None)) is None
        for channel, identity, password in ((intruder, None, "s3cret"),  # untrusted application, right password
                                            (intruder, intruder, None),  # untrusted certificate user
                                            (plc, intruder, None)):  # trusted application, untrusted user
            with pytest.raises(Exception):  # noqa: B017, PT011 - asyncua raises its status as several types
                asyncio.run(_acknowledge_as(endpoint, server_cert, channel, identity, password, None))


async def _acknowledge_as(endpoint: str, server_cert: Path, channel: tuple[Path, Path],
                          identity: tuple[Path, Path] | None, password: str | None, alarm_id: int | None):
    """Connects over Basic256Sha256 with the ``channel`` application certificate, logged in by the ``identity``
    certificate or as ``operator``/``password``; acknowledges ``alarm_id`` when given."""
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    client = Client(endpoint)
    client.application_uri = f"urn:test:{channel[0].stem}"
    await client.set_security(SecurityPolicyBasic256Sha256, str(channel[0]), str(channel[1]),
                              server_certificate=str(server_cert))
    if identity is not None:
        await client.load_client_certificate(str(identity[0]))
        await client.load_private_key(identity[1])
    else:
        client.set_user("operator")
        client.set_password(password)
    async with client:
        idx = await client.get_namespace_index(NAMESPACE)
        alarms = await client.nodes.objects.get_child([f"{idx}:Line", f"{idx}:Alarms"])
        if alarm_id is None:
            return None
        return await alarms.call_method(f"{idx}:AcknowledgeAlarm", ua.Variant(alarm_id, ua.VariantType.Int64))
