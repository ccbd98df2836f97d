"""The line's OPC UA server (``server serve --opcua-endpoint opc.tcp://HOST:PORT``), with asyncua.

It runs in the server's event loop (the gRPC server is ``grpc.aio``) and publishes, under one
namespace (:data:`NAMESPACE`), what the line monitor (:mod:`server.line_monitor`) knows: the line's
serving state, model version and frames/s; per camera its frames, last defect and drift state; the
open coil (id, length so far, frames, defects per class, grade so far, periodic defects) and the
last closed coil (id, grade, the deciding rule). Values are written twice a second, and only those
that changed, from the monitor's snapshot: nothing here runs per frame.

Alarms are OPC UA events of ``AlarmConditionType`` (Severity, Message, SourceName = the camera,
ConditionName = the rule, ActiveState, AckedState) emitted by ``Line/Alarms``; an acknowledgement is
made with the standard ``Acknowledge(EventId, Comment)`` method on ``Line/Alarms`` or with
``Line/Alarms/AcknowledgeAlarm(alarm_id)``; it goes through the alarm book, so it is stored and seen by
the console, and one made elsewhere is published here as an event with AckedState true. The method
``Line/EndCoil(coil_id, length_mm)`` ends a coil as the gRPC ``EndCoil`` does (length 0: the furthest
frame's end). Frames are never exposed.

Security: anonymous access is off unless ``--opcua-anonymous``; users come from ``--opcua-users FILE``
(``name:password`` lines, or ``name:sha256:HEX``). With ``--opcua-cert``/``--opcua-key`` the endpoint
offers only Basic256Sha256 Sign&Encrypt, so passwords and values are encrypted; without them it offers
no message security and passwords cross the network in clear (loopback or a closed control network).
``--opcua-trusted-certs DIR`` (with ``--opcua-cert``) adds certificate users: asyncua's trust store of the
folder's certificates (or CAs) checks every client's application certificate when its session is created
(an untrusted one is refused), and a client may log in with its certificate instead of a password, as
the user named by the certificate's subject CN. An acknowledgement is stored as ``opcua:<user>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asyncua import Node, Server, ua
from asyncua.common.ua_utils import value_to_datavalue
from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import SimpleRoleRuleset, User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from cryptography import x509

from coils.alarms import Alarm
from server.line_monitor import CoilState, LineSnapshot

log = logging.getLogger(__name__)

NAMESPACE = "urn:strip-inspection:line"
#: The server's application URI (a certificate given with --opcua-cert should carry it).
APPLICATION_URI = "urn:strip-inspection:server"
#: Most characters of a user's name stored with an acknowledgement (the column holds 256).
MAX_USER_CHARS = 200
#: Seconds between two publications of the line's values.
PUBLISH_INTERVAL_S = 0.5
_S, _D, _U = ua.VariantType.String, ua.VariantType.Double, ua.VariantType.UInt64


class FileUsers:
    """asyncua user manager: the users of a ``name:password`` (or ``name:sha256:HEX``) file, the certificate
    users of a trust store (named by their subject CN), and anonymous if allowed."""

    def __init__(self, path: Path | None, anonymous: bool, trust: TrustStore | None = None) -> None:
        self.anonymous, self.trust = anonymous, trust
        self.users: dict[str, str] = {}
        for n, line in enumerate(Path(path).read_text().splitlines() if path is not None else [], 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, sep, secret = line.strip().partition(":")
            if not sep or not name or not secret:
                raise ValueError(f"--opcua-users {path}:{n}: expected name:password or name:sha256:HEX")
            self.users[name] = secret if secret.startswith("sha256:") else "sha256:" + _sha256(secret)

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: bytes | None = None) -> User | None:
        """The session's user; None refuses it. ``certificate`` is the X509 identity token's (asyncua has
        checked its signature), or the channel's when the token is anonymous: either way the client holds
        its key, so a trusted one names the user."""
        if username is not None:
            expected = self.users.get(username)
            given = "sha256:" + _sha256(password or "")
            return User(role=UserRole.User, name=username) if expected and hmac.compare_digest(expected, given) else None
        if certificate and self.trust is not None:
            trusted = uacrypto.x509_from_der(certificate)
            if self.trust.validate(trusted):
                return User(role=UserRole.User, name=common_name(trusted))
        return User(role=UserRole.User, name="anonymous") if self.anonymous else None


def common_name(certificate: x509.Certificate) -> str:
    """The certificate's subject CN (its whole subject when it has none): the name of a certificate user."""
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.subject.rfc4514_string()


#: The user of the request being served. asyncua hands a method no session, but serves each connection's
#: requests in one task and asks the permission rules first, with the session's user: they note it here.
_caller: contextvars.ContextVar[str] = contextvars.ContextVar("opcua_caller", default="opcua")


class CallerRules(SimpleRoleRuleset):
    """asyncua's standard role rules, noting each request's user for the methods (see :data:`_caller`)."""

    def check_validity(self, user: User | None, action_type_id: ua.NodeId, body: Any) -> bool:
        _caller.set(f"opcua:{user.name[:MAX_USER_CHARS]}" if user is not None and user.name else "opcua")
        return super().check_validity(user, action_type_id, body)


async def _trust_store(folder: Path) -> TrustStore:
    """The trust store of ``--opcua-trusted-certs`` (refused at start when it holds no certificate)."""
    if not any(f.suffix.lower() in (".der", ".pem") for f in Path(folder).iterdir()):
        raise ValueError(f"--opcua-trusted-certs {folder}: no .der or .pem certificate in it")
    trust = TrustStore([Path(folder)], [])
    await trust.load()
    return trust


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _argument(name: str, data_type: int, description: str) -> ua.Argument:
    argument = ua.Argument()
    argument.Name, argument.DataType, argument.ValueRank = name, ua.NodeId(data_type), -1
    argument.Description = ua.LocalizedText(description)
    return argument


class LineOpcUa:
    """The OPC UA server of one inspection server (see the module's doc)."""

    def __init__(self, server: Any, actions: Any, opc: Server, idx: int, class_names: Sequence[str]) -> None:
        self.server, self.actions, self.opc, self.idx = server, actions, opc, idx
        self.class_names = list(class_names)
        self.nodes: dict[str, Node] = {}
        self._written: dict[str, Any] = {}
        self._types: dict[str, ua.VariantType] = {}
        self._alarms: asyncio.Queue[Alarm] = asyncio.Queue()
        self._event_ids: dict[bytes, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._generator: Any = None

    @classmethod
    async def start(cls, server: Any, actions: Any, class_names: Sequence[str]) -> LineOpcUa:
        """Builds the address space and opens the endpoint (OSError when it cannot be bound)."""
        cfg = server.config
        trust = await _trust_store(cfg.opcua_trusted_certs) if cfg.opcua_trusted_certs is not None else None
        opc = Server(user_manager=FileUsers(cfg.opcua_users, cfg.opcua_anonymous, trust))
        await opc.init()
        opc.set_endpoint(cfg.opcua_endpoint)
        opc.set_server_name("strip inspection: line")
        await opc.set_application_uri(APPLICATION_URI)
        if cfg.opcua_cert is not None:
            await opc.load_certificate(str(cfg.opcua_cert))
            await opc.load_private_key(str(cfg.opcua_key))
            opc.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt], CallerRules())
        else:
            opc.set_security_policy([ua.SecurityPolicyType.NoSecurity], CallerRules())
        if trust is not None:
            opc.set_certificate_validator(CertificateValidator(
                CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT, trust).validate)
        tokens: list[type] = ([ua.UserNameIdentityToken] if cfg.opcua_users is not None or trust is None else []) + (
            [ua.X509IdentityToken] if trust is not None else []) + (
            [ua.AnonymousIdentityToken] if cfg.opcua_anonymous else [])
        opc.set_identity_tokens(tokens)
        idx = await opc.register_namespace(NAMESPACE)
        self = cls(server, actions, opc, idx, class_names)
        await self._build(cfg.line)
        await opc.start()
        loop = asyncio.get_running_loop()
        actions.book.listeners.append(lambda alarm: loop.call_soon_threadsafe(self._alarms.put_nowait, alarm))
        self._tasks = [loop.create_task(self._publish_forever()), loop.create_task(self._send_alarms())]
        log.info("event=opcua_start endpoint=%s security=%s anonymous=%s users=%d trusted_certs=%s", cfg.opcua_endpoint,
                 "Basic256Sha256" if cfg.opcua_cert else "none", cfg.opcua_anonymous, len(opc.iserver.user_manager.users),
                 cfg.opcua_trusted_certs)
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.opc.stop()

    # ------------------------------------------------------------------ the address space
    async def _build(self, line: Any) -> None:
        objects = self.opc.nodes.objects
        root = self.nodes["Line"] = await objects.add_object(self.idx, "Line")
        await self._variables(root, "Line", (("ServingState", "loading", _S), ("ModelVersion", "", _S),
                                             ("FramesPerSecond", 0.0, _D)))
        cameras = await root.add_folder(self.idx, "Cameras")
        for camera in line.cameras:
            node = await cameras.add_object(self.idx, camera.camera_id)
            await self._variables(node, f"Cameras/{camera.camera_id}", (
                ("Frames", 0, _U), ("LastDefect", "", _S), ("DriftState", "not scored", _S)))
        coil = await root.add_object(self.idx, "OpenCoil")
        await self._variables(coil, "OpenCoil", (
            ("CoilId", "", _S), ("LengthMm", 0.0, _D), ("Frames", 0, _U), ("Defects", 0, _U), ("Grade", "", _S),
            ("GradeRule", "", _S), ("PeriodicCount", 0, _U), ("PeriodicDefects", "", _S)))
        per_class = await coil.add_object(self.idx, "DefectsPerClass")
        await self._variables(per_class, "OpenCoil/DefectsPerClass", [(n, 0, _U) for n in self.class_names])
        closed = await root.add_object(self.idx, "LastClosedCoil")
        await self._variables(closed, "LastClosedCoil", (
            ("CoilId", "", _S), ("LengthMm", 0.0, _D), ("Defects", 0, _U), ("Grade", "", _S), ("GradeRule", "", _S),
            ("PeriodicDefects", "", _S)))
        alarms = self.nodes["Alarms"] = await root.add_object(self.idx, "Alarms")
        await self._variables(alarms, "Alarms", (("Unacknowledged", 0, _U), ("Latest", "", _S)))
        await root.add_method(self.idx, "EndCoil", self._end_coil,
                              [_argument("coil_id", ua.ObjectIds.String, "the coil to end"),
                               _argument("length_mm", ua.ObjectIds.Double, "its length; 0: the furthest frame's end")],
                              [_argument("state", ua.ObjectIds.String, "the coil's state after the call"),
                               _argument("defects", ua.ObjectIds.UInt64, "its defect records"),
                               _argument("grade", ua.ObjectIds.String, "its grade (empty without --grading)")])
        await alarms.add_method(self.idx, "AcknowledgeAlarm", self._acknowledge_by_id,
                                [_argument("alarm_id", ua.ObjectIds.Int64, "the alarm's id (the event's AlarmId)")],
                                [_argument("acknowledged", ua.ObjectIds.Boolean, "true once acknowledged")])
        self.opc.link_method(self.opc.get_node(ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge)),
                             self._acknowledge_event)
        self._generator = await self.opc.get_event_generator(ua.ObjectIds.AlarmConditionType, alarms)

    async def _variables(self, parent: Node, path: str, specs: Sequence[tuple[str, Any, ua.VariantType]]) -> None:
        for name, value, vtype in specs:
            key = f"{path}/{name}"
            self.nodes[key] = await parent.add_variable(self.idx, name, ua.Variant(value, vtype))
            self._written[key], self._types[key] = value, vtype

    # ------------------------------------------------------------------ publishing
    async def _publish_forever(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception:  # noqa: BLE001 - the publisher outlives one failed write
                log.exception("event=opcua_publish_error")
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def publish(self) -> None:
        """Writes the values that changed since the last call."""
        server, snapshot = self.server, self.actions.monitor.snapshot()
        state = "serving" if server.is_serving() else "loading" if server.info is None else "stopping"
        values: dict[str, Any] = {"Line/ServingState": state, "Line/FramesPerSecond": round(snapshot.frames_per_s, 1),
                                  "Line/ModelVersion": server.info.model_version if server.info else ""}
        drift = self.actions.drift()
        for camera_id, camera in snapshot.cameras.items():
            if f"Cameras/{camera_id}/Frames" in self.nodes:
                values[f"Cameras/{camera_id}/Frames"] = camera.frames
                values[f"Cameras/{camera_id}/LastDefect"] = camera.last_defect
                values[f"Cameras/{camera_id}/DriftState"] = ("drift: " + ", ".join(drift[camera_id])
                                                              if camera_id in drift else "ok")
        values.update(self._coil_values(snapshot))
        values["Alarms/Unacknowledged"] = len(self.actions.book.active())
        changed = {key: value for key, value in values.items() if self._written.get(key) != value}
        if changed:  # one write of every changed value: one pass through the address space's locks and callbacks
            params = ua.WriteParameters()
            params.NodesToWrite = [ua.WriteValue(NodeId=self.nodes[key].nodeid, AttributeId=ua.AttributeIds.Value,
                                                 Value=value_to_datavalue(ua.Variant(value, self._types[key])))
                                   for key, value in changed.items()]
            for key, status in zip(changed, await self.nodes["Line/ServingState"].write_params(params), strict=True):
                status.check()
                self._written[key] = changed[key]

    def _coil_values(self, snapshot: LineSnapshot) -> dict[str, Any]:
        values: dict[str, Any] = {}
        coil = snapshot.open_coils[-1] if snapshot.open_coils else _NO_COIL
        values.update({"OpenCoil/CoilId": coil.coil_id, "OpenCoil/LengthMm": coil.length_mm,
                       "OpenCoil/Frames": coil.frames, "OpenCoil/Defects": sum(coil.defects_per_class.values()),
                       "OpenCoil/Grade": coil.grade, "OpenCoil/GradeRule": coil.grade_rule,
                       "OpenCoil/PeriodicCount": len(coil.periodic),
                       "OpenCoil/PeriodicDefects": _periodic_text(coil.periodic)})
        for k, name in enumerate(self.class_names, 1):
            values[f"OpenCoil/DefectsPerClass/{name}"] = coil.defects_per_class.get(k, 0)
        if snapshot.last_closed is not None:
            c = snapshot.last_closed
            values.update({"LastClosedCoil/CoilId": c.coil_id, "LastClosedCoil/LengthMm": c.length_mm,
                           "LastClosedCoil/Defects": sum(c.defects_per_class.values()), "LastClosedCoil/Grade": c.grade,
                           "LastClosedCoil/GradeRule": c.grade_rule,
                           "LastClosedCoil/PeriodicDefects": _periodic_text(c.periodic)})
        return values

    # ------------------------------------------------------------------ alarms
    async def _send_alarms(self) -> None:
        while True:
            alarm = await self._alarms.get()
            try:
                await self._emit(alarm)
            except Exception:  # noqa: BLE001
                log.exception("event=opcua_alarm_error id=%d", alarm.alarm_id)

    async def _emit(self, alarm: Alarm) -> None:
        event = self._generator.event
        event.Severity, event.ConditionName = alarm.severity, alarm.rule
        event.SourceName = alarm.camera_id or "line"
        event.NodeId = self.nodes["Alarms"].nodeid  # the ConditionId: Acknowledge is called on it
        event.ActiveState, event.__dict__["ActiveState/Id"] = ua.LocalizedText("Active"), True
        acked = "Acknowledged" if alarm.acknowledged else "Unacknowledged"
        event.AckedState, event.__dict__["AckedState/Id"] = ua.LocalizedText(acked), alarm.acknowledged
        event.Retain = not alarm.acknowledged
        event.Comment = ua.LocalizedText(f"alarm {alarm.alarm_id}" + (f", acknowledged by {alarm.acknowledged_by}"
                                                                      if alarm.acknowledged else ""))
        await self._generator.trigger(message=alarm.message)
        self._event_ids[bytes(event.EventId.Value)] = alarm.alarm_id
        if len(self._event_ids) > 10_000:
            self._event_ids.pop(next(iter(self._event_ids)))
        await self.nodes["Alarms/Latest"].write_value(ua.Variant(f"{alarm.alarm_id}: {alarm.message}", _S))

    async def _acknowledge_by_id(self, parent: ua.NodeId, alarm_id: ua.Variant) -> list[ua.Variant]:
        await self._acknowledge(int(alarm_id.Value))
        return [ua.Variant(True, ua.VariantType.Boolean)]

    async def _acknowledge_event(self, parent: ua.NodeId, event_id: ua.Variant, comment: ua.Variant) -> list[ua.Variant]:
        """The standard ``Acknowledge(EventId, Comment)`` of an alarm event."""
        alarm_id = self._event_ids.get(bytes(event_id.Value or b""))
        if alarm_id is None:
            raise ua.UaStatusCodeError(ua.StatusCodes.BadEventIdUnknown)
        await self._acknowledge(alarm_id)
        return []

    async def _acknowledge(self, alarm_id: int) -> None:
        """Acknowledges in the alarm book as ``opcua:<the session's user>``."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.actions.book.acknowledge, alarm_id, _caller.get())
        except KeyError:
            raise ua.UaStatusCodeError(ua.StatusCodes.BadNotFound) from None

    # ------------------------------------------------------------------ EndCoil
    async def _end_coil(self, parent: ua.NodeId, coil_id: ua.Variant, length_mm: ua.Variant) -> list[ua.Variant]:
        """Ends a coil as gRPC EndCoil does; BadNotFound for an unknown coil, BadResourceUnavailable while the
        database is down, BadInvalidArgument for an empty id or a negative length."""
        from coils.store import StoreUnavailable

        tracker = self.server.coils
        coil, length = str(coil_id.Value or ""), float(length_mm.Value or 0.0)
        if tracker is None or not coil or length < 0:
            code = ua.StatusCodes.BadNotSupported if tracker is None else ua.StatusCodes.BadInvalidArgument
            raise ua.UaStatusCodeError(code)

        def end() -> tuple[Any, Any]:
            summary = tracker.end_coil(coil, length or None)
            return summary, tracker.store.verdict(summary, [])

        try:
            summary, verdict = await asyncio.get_running_loop().run_in_executor(tracker.reader, end)
        except KeyError:
            raise ua.UaStatusCodeError(ua.StatusCodes.BadNotFound) from None
        except StoreUnavailable:
            raise ua.UaStatusCodeError(ua.StatusCodes.BadResourceUnavailable) from None
        log.info("event=opcua_end_coil coil=%r at=%.3f", coil, time.time())
        return [ua.Variant(summary.state, _S), ua.Variant(summary.defects, _U), ua.Variant(verdict.grade, _S)]


#: What the OpenCoil node shows while no coil is open.
_NO_COIL = CoilState("", 0.0, 0, {})


def _periodic_text(periodic: Sequence[Any]) -> str:
    return "; ".join(f"class {p.class_id} every {p.period_mm:.1f} mm at {p.across_start_mm:.0f} mm across, "
                     f"{p.count}x{', roll ' + p.roll if p.roll else ''}" for p in periodic)


__all__ = ["APPLICATION_URI", "CallerRules", "FileUsers", "LineOpcUa", "NAMESPACE", "common_name"]
