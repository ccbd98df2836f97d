"""The ``inspection.v1.ModelControl`` gRPC service: list, load, unload, promote, roll back, audit,
shadow runs on and off, and ``GetModels`` (production, candidate and their agreement).

It serves on the inspection server's own port (:func:`add_model_control` registers it before the
server starts). Every call but ``GetModels`` (which only reads) first needs the admin role (:class:`server.auth.AdminPolicy`); a change
that is refused or fails answers FAILED_PRECONDITION with the reason, and production keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import grpc

from protos.inspection.v1 import model_control_pb2 as mc
from protos.inspection.v1 import model_control_pb2_grpc as mc_grpc
from server.auth import AdminPolicy, AdminRefused
from server.model_repo import RepositoryError
from server.models import ModelChangeRefused, ModelManager

if TYPE_CHECKING:
    from server.service import InspectionServer

log = logging.getLogger(__name__)

SERVICE_NAME = mc.DESCRIPTOR.services_by_name["ModelControl"].full_name


def model_list(manager: ModelManager) -> mc.ModelList:
    """The repository's versions and roles, as ``ListModels`` answers them."""
    repository, roles = manager.repository, manager.repository.roles
    candidate = manager.candidate.version if manager.candidate else None
    versions = []
    for version in repository.versions():
        role = "production" if version == roles.production else "candidate" if version == roles.candidate else ""
        try:
            file = repository.model_file(version).name
        except RepositoryError:
            file = ""
        versions.append(mc.ModelVersion(version=version, role=role, file=file,
                                        loaded=version in (roles.production, candidate)))
    return mc.ModelList(production=roles.production, candidate=roles.candidate or "", history=list(roles.history),
                        versions=versions)


def models_status(manager: ModelManager) -> mc.ModelsStatus:
    """``GetModels``' answer: the roles and the shadow run's statistics."""
    candidate = manager.candidate.version if manager.candidate else ""
    answer = mc.ModelsStatus(production=manager.production_version, candidate=candidate,
                             shadow_share=manager.shadow.share)
    status = manager.shadow.status()
    if status is not None:
        answer.shadow_frames, answer.shadow_skipped = status.frames, status.skipped
        answer.disagreeing_frames, answer.candidate_latency_ms = status.disagreeing_frames, status.latency_s * 1e3
        answer.classes.extend(
            mc.ClassAgreement(name=c.name, presence_agreement=status.presence_agreement(k), dice=status.dice(k),
                              dice_frames=c.dice_frames, pixel_count_difference=status.count_difference(k))
            for k, c in enumerate(status.classes))
    return answer


class ModelControlServicer(mc_grpc.ModelControlServicer):
    """The management calls of ``manager``, each behind ``policy``."""

    def __init__(self, manager: ModelManager, policy: AdminPolicy) -> None:
        self.manager = manager
        self.policy = policy

    async def _admit(self, context: grpc.aio.ServicerContext) -> str:
        try:
            return self.policy.authorize(context)
        except AdminRefused as exc:
            log.warning("event=management_refused peer=%s why=%r", context.peer(), str(exc))
            await context.abort(exc.code, str(exc))
            raise  # abort() raises: never reached

    async def _change(self, context: grpc.aio.ServicerContext, change: Awaitable[Any]) -> mc.ModelList:
        try:
            await change
        except ModelChangeRefused as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return model_list(self.manager)

    async def ListModels(self, request: mc.ListModelsRequest, context: grpc.aio.ServicerContext) -> mc.ModelList:
        await self._admit(context)
        return model_list(self.manager)

    async def LoadModel(self, request: mc.ModelRequest, context: grpc.aio.ServicerContext) -> mc.ModelList:
        who = await self._admit(context)
        return await self._change(context, self.manager.load(request.version, who))

    async def UnloadModel(self, request: mc.ModelRequest, context: grpc.aio.ServicerContext) -> mc.ModelList:
        who = await self._admit(context)
        return await self._change(context, self.manager.unload(request.version, who))

    async def Promote(self, request: mc.ModelRequest, context: grpc.aio.ServicerContext) -> mc.ModelList:
        who = await self._admit(context)
        return await self._change(context, self.manager.promote(request.version or None, who))

    async def Rollback(self, request: mc.RollbackRequest, context: grpc.aio.ServicerContext) -> mc.ModelList:
        who = await self._admit(context)
        return await self._change(context, self.manager.rollback(who))

    async def GetAudit(self, request: mc.AuditRequest, context: grpc.aio.ServicerContext) -> mc.AuditLog:
        await self._admit(context)
        entries = self.manager.repository.audit(request.last or None)
        return mc.AuditLog(entries=[mc.AuditEntry(time=e.time, action=e.action, version=e.version, sha256=e.sha256,
                                                  who=e.who, outcome=e.outcome, why=e.why) for e in entries])


    async def GetModels(self, request: mc.GetModelsRequest, context: grpc.aio.ServicerContext) -> mc.ModelsStatus:
        return models_status(self.manager)

    async def SetShadow(self, request: mc.ShadowRequest, context: grpc.aio.ServicerContext) -> mc.ModelsStatus:
        who = await self._admit(context)
        try:
            await self.manager.set_shadow_share(request.share, who)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return models_status(self.manager)


def add_model_control(server: InspectionServer, manager: ModelManager, policy: AdminPolicy) -> None:
    """Serves ``ModelControl`` on ``server``'s port (call before ``server.start()``) and logs who may use it."""
    servicer = ModelControlServicer(manager, policy)
    server.extra_services.append(lambda grpc_server: mc_grpc.add_ModelControlServicer_to_server(servicer, grpc_server))
    if policy.loopback_only:
        log.warning("event=management_access %s", policy.describe())
    else:
        log.info("event=management_access %s", policy.describe())
    if policy.token is not None and server.config.tls_cert is None:
        log.warning("event=management_token_in_clear the admin token travels unencrypted: serve TLS (--tls-cert, "
                    "--tls-key) or bind to a trusted network only")


__all__ = ["SERVICE_NAME", "ModelControlServicer", "add_model_control", "model_list", "models_status"]
