"""Hot swap of the served model: load, promote and roll back versions of a :class:`ModelRepository`
while the line keeps streaming.

Loading a version (:meth:`ModelManager.load`) reads it through the backend factory on a thread of
its own (the inference thread keeps running production), warms it up at every batch size the
batcher forms, and checks it fits the line: the same frame size and classes as production (unless
``allow_class_change``) and room for the batcher's largest batch. Only then can it be switched in.

The switch (:meth:`ModelManager.promote`, :meth:`ModelManager.rollback`) happens between batches:
the batcher takes its backend once per batch (:meth:`server.batcher.DynamicBatcher.swap`), so a
batch runs entirely on one model, batches already started finish on the old one, and the old one is
closed on the inference thread after them. Each answer names the version that produced it, so on
one stream the version changes once per swap and never goes back between swaps. A load that fails
(a corrupt file, an incompatible model, out of memory) changes nothing: production keeps serving,
health stays SERVING, and the failure is raised with its reason and written to the audit log.

Every change is recorded in the repository's audit log before the call that asked for it returns;
the roles file is replaced before the switch, so a restarted server serves what was promoted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from engine.backends.base import Backend, InspectionResult
from server.model_repo import AuditEntry, ModelRepository, RepositoryError, Roles
from server.shadow import ShadowCollector, ShadowRunner, capture_disagreement
from server.wire import model_info

if TYPE_CHECKING:
    from server.batcher import FinishedBatch
    from server.service import InspectionServer

T = TypeVar("T")

log = logging.getLogger(__name__)

RECENT_AUDIT = 8  # audit entries kept in memory for the console


class ModelChangeRefused(RuntimeError):
    """A load, promote, rollback or unload that was not done; production serves as before. Says why."""


@dataclass
class LoadedModel:
    """A version in memory: its backend, ready to serve (loaded, warmed up, checked)."""

    version: str
    backend: Backend
    sha256: str


def compatibility_problem(candidate: Backend, production: Backend, max_batch: int,
                          allow_class_change: bool = False) -> str | None:
    """Why ``candidate`` cannot replace ``production`` on this line, or None when it can."""
    new, old = candidate.metadata, production.metadata
    if new.input_size != old.input_size:
        return (f"frame size {new.input_width}x{new.input_height} differs from production's "
                f"{old.input_width}x{old.input_height}")
    if not allow_class_change and (list(new.class_ids), list(new.class_names)) != (list(old.class_ids),
                                                                                     list(old.class_names)):
        return (f"classes {list(new.class_names)} differ from production's {list(old.class_names)} "
                "(start the server with --allow-class-change to allow it)")
    limit = candidate.max_batch_size
    if limit is not None and limit < max_batch:
        return f"takes at most {limit} frames per batch; the server forms batches of up to {max_batch}"
    return None


class ModelManager:
    """Loads, switches and unloads versions of ``repository`` in a running ``server``.

    Args:
        server: the inspection server; it loads production itself (:func:`production_loader`).
        repository: the versions and their roles.
        load_backend: makes a backend from a model file (the server's backend factory).
        allow_class_change: a version with other classes than production's may be promoted.
        shadow_share: the share of live frames the loaded candidate runs in shadow (0: none until
            ``shadow.set_share``).
    """

    def __init__(self, server: InspectionServer, repository: ModelRepository,
                 load_backend: Callable[[Path], Backend], allow_class_change: bool = False,
                 shadow_share: float = 0.0) -> None:
        self.server = server
        self.repository = repository
        self.allow_class_change = allow_class_change
        self._load_backend = load_backend
        self.candidate: LoadedModel | None = None
        #: The audit log's last entries (what the console shows), oldest first.
        self.recent_audit: deque[AuditEntry] = deque(repository.audit(last=RECENT_AUDIT), maxlen=RECENT_AUDIT)
        self._lock = asyncio.Lock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-load")
        self.shadow = ShadowRunner(shadow_share, on_disagree=self._capture_disagreement, busy=self._production_busy)
        server.batch_listeners.append(self.shadow.submit)
        server.metrics.registry.register(ShadowCollector(lambda: self.shadow))

    def _production_busy(self) -> bool:
        """A full batch waits for the inference thread: no spare capacity for a shadow run."""
        batcher = self.server.batcher
        return batcher is not None and batcher.queued >= batcher.max_batch

    @property
    def production_version(self) -> str:
        return self.repository.roles.production

    # ------------------------------------------------------------------ the operations

    async def load(self, version: str, who: str) -> LoadedModel:
        """Loads ``version`` as the candidate (an earlier candidate is unloaded).

        Raises:
            ModelChangeRefused: no such version, it is production, or loading or the checks failed.
        """
        async with self._lock:
            return await self._audited("load", version, who, self._load_candidate(version))

    async def unload(self, version: str, who: str) -> None:
        """Unloads the candidate ``version`` (production cannot be unloaded, only replaced)."""
        async with self._lock:
            await self._audited("unload", version, who, self._unload_candidate(version))

    async def promote(self, version: str | None, who: str) -> str:
        """Makes ``version`` (default: the candidate) production by a hot swap; returns it."""
        async with self._lock:
            target = version or (self.candidate.version if self.candidate else "")
            return await self._audited("promote", target, who, self._promote(target, rollback=False))

    async def rollback(self, who: str) -> str:
        """Makes the previous production version production again by a hot swap; returns it."""
        async with self._lock:
            history = self.repository.roles.history
            target = history[-1] if history else ""
            return await self._audited("rollback", target, who, self._promote(target, rollback=True))

    def _capture_disagreement(self, version: str, batch: FinishedBatch, i: int, result: InspectionResult) -> None:
        feedback, candidate = self.server.feedback, self.candidate
        ours = candidate is not None and candidate.version == version
        min_areas = candidate.backend.metadata.min_areas if ours else None
        capture_disagreement(feedback.writer if feedback is not None else None, version, batch, i, result, min_areas)

    async def set_shadow_share(self, share: float, who: str) -> None:
        """Shadow runs of the candidate on ``share`` of live frames (0: off); audited.

        Raises:
            ValueError: a share outside 0..1 (audited as refused).
        """
        version = self.candidate.version if self.candidate else ""
        try:
            self.shadow.set_share(share)
        except ValueError as exc:
            await self._record("shadow", version, who, "refused", str(exc))
            raise
        await self._record("shadow", version, who, "ok", f"share {share:g}")
        log.info("event=model_shadow share=%g candidate=%s who=%r", share, version or "none", who)

    async def close(self) -> None:
        """Unloads the candidate and stops the loading and shadow threads (after the server has stopped)."""
        await self.shadow.detach()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.shadow.close)
        if self.candidate is not None:
            self.candidate.backend.close()
            self.candidate = None
        await loop.run_in_executor(None, self._loader.shutdown, True)

    async def restore_candidate(self) -> None:
        """Loads the candidate the roles name (a restarted server); a failure is logged and audited."""
        version = self.repository.roles.candidate
        if version is not None and self.candidate is None:
            try:
                await self.load(version, who="server (restart)")
            except ModelChangeRefused:
                pass  # audited and logged: production serves without a candidate

    # ------------------------------------------------------------------ steps

    async def _audited(self, action: str, version: str, who: str, step: Awaitable[T]) -> T:
        """Runs ``step`` (a coroutine) and writes its outcome to the audit log either way."""
        try:
            result = await step
        except ModelChangeRefused as exc:
            outcome = "failed" if isinstance(exc.__cause__, Exception) else "refused"
            await self._record(action, version, who, outcome, str(exc))
            log.warning("event=model_%s version=%s who=%r outcome=%s why=%r", action, version, who, outcome, str(exc))
            raise
        await self._record(action, version, who, "ok")
        log.info("event=model_%s version=%s who=%r outcome=ok production=%s", action, version, who,
                 self.production_version)
        return result

    async def _record(self, action: str, version: str, who: str, outcome: str, why: str = "") -> None:
        """Appends the audit entry, durably, off the event loop (hashing a model file takes a while)."""
        def record() -> AuditEntry:
            sha = self.repository.sha256(version) if version else ""
            entry = AuditEntry.now(action, version, sha, who, outcome, why)
            self.repository.record(entry)
            return entry

        self.recent_audit.append(await asyncio.get_running_loop().run_in_executor(None, record))

    async def _load_candidate(self, version: str) -> LoadedModel:
        if version == self.production_version:
            raise ModelChangeRefused(f"version {version!r} is production already")
        if self.candidate is not None and self.candidate.version == version:
            return self.candidate
        loaded = await self._load_checked(version)
        roles = self.repository.roles
        try:
            self._write_roles(Roles(roles.production, version, roles.history))
        except ModelChangeRefused:
            await asyncio.get_running_loop().run_in_executor(self._loader, loaded.backend.close)
            raise
        await self._drop_candidate()
        self.candidate = loaded
        self.shadow.attach(loaded.version, loaded.backend)
        return loaded

    async def _unload_candidate(self, version: str) -> None:
        if self.candidate is None or self.candidate.version != version:
            loaded = self.candidate.version if self.candidate else "none"
            raise ModelChangeRefused(f"version {version!r} is not the loaded candidate (the candidate is {loaded}); "
                                     "production is replaced by promote or rollback, never unloaded")
        roles = self.repository.roles
        self._write_roles(Roles(roles.production, None, roles.history))
        await self._drop_candidate()

    async def _drop_candidate(self) -> None:
        if self.candidate is not None:
            await self.shadow.detach()
            backend, self.candidate = self.candidate.backend, None
            await asyncio.get_running_loop().run_in_executor(self._loader, backend.close)

    async def _promote(self, version: str, rollback: bool) -> str:
        if not version:
            raise ModelChangeRefused("no previous production version to roll back to" if rollback
                                     else "no version named and no candidate loaded")
        if version == self.production_version:
            raise ModelChangeRefused(f"version {version!r} is production already")
        was_candidate = self.candidate is not None and self.candidate.version == version
        if was_candidate:
            loaded = self.candidate
            self._check(loaded)  # production may have changed since the candidate was loaded
        else:
            loaded = await self._load_checked(version)
        roles = self.repository.roles
        history = roles.history[:-1] if rollback else (*roles.history, roles.production)
        try:
            self._write_roles(Roles(version, None if roles.candidate == version else roles.candidate, history))
        except ModelChangeRefused:
            if not was_candidate:
                await asyncio.get_running_loop().run_in_executor(self._loader, loaded.backend.close)
            raise
        if was_candidate:
            await self.shadow.detach()  # the candidate's backend moves to the inference thread
            self.candidate = None
        await self._switch(loaded)
        return version

    def _write_roles(self, roles: Roles) -> None:
        """Records ``roles`` durably before they take effect; a disk that refuses refuses the change."""
        try:
            self.repository.set_roles(roles)
        except OSError as exc:
            raise ModelChangeRefused(f"cannot record the new roles in the repository: {exc}") from exc

    def _check(self, loaded: LoadedModel) -> None:
        """Raises ModelChangeRefused when ``loaded`` cannot replace the current production."""
        batcher, production = self.server.batcher, self.server.backend
        assert batcher is not None and production is not None
        problem = compatibility_problem(loaded.backend, production, batcher.max_batch, self.allow_class_change)
        if problem is not None:
            raise ModelChangeRefused(f"version {loaded.version!r} does not fit this line: {problem}")

    async def _load_checked(self, version: str) -> LoadedModel:
        """``version`` loaded, warmed up and checked against production, or ModelChangeRefused."""
        batcher, production = self.server.batcher, self.server.backend
        if batcher is None or production is None:
            raise ModelChangeRefused("the server has not loaded its production model yet")
        try:
            path = self.repository.model_file(version)
        except RepositoryError as exc:
            raise ModelChangeRefused(str(exc)) from None
        sha = await asyncio.get_running_loop().run_in_executor(self._loader, self.repository.sha256, version)
        sizes = tuple(range(1, batcher.max_batch + 1))
        loop = asyncio.get_running_loop()
        try:
            backend = await loop.run_in_executor(self._loader, self._load_backend, path)
        except Exception as exc:  # noqa: BLE001 - whatever a corrupt file raises, production stays
            raise ModelChangeRefused(f"loading version {version!r} ({path.name}) failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
        loaded = LoadedModel(version, backend, sha)
        try:
            self._check(loaded)
            if self.server.config.warmup:
                await loop.run_in_executor(self._loader, backend.warmup, sizes)
        except ModelChangeRefused:
            await loop.run_in_executor(self._loader, backend.close)
            raise
        except Exception as exc:  # noqa: BLE001
            await loop.run_in_executor(self._loader, backend.close)
            raise ModelChangeRefused(f"warming up version {version!r} failed: {type(exc).__name__}: {exc}") from exc
        return loaded

    async def _switch(self, loaded: LoadedModel) -> None:
        """Between batches: ``loaded`` serves every batch from now on; the old backend is closed after
        the batches already running on it."""
        batcher = self.server.batcher
        assert batcher is not None
        previous = batcher.swap(loaded.backend, loaded.version)
        self.server.backend = loaded.backend
        self.server.info = model_info(loaded.backend, batcher.max_batch, loaded.version)
        await batcher.run_on_backend_thread(previous.close)


def production_loader(repository: ModelRepository, load_backend: Callable[[Path], Backend]) -> Callable[[], Backend]:
    """The server's backend factory for ``repository``: its production version's model."""
    return lambda: load_backend(repository.model_file(repository.roles.production))


__all__ = ["LoadedModel", "ModelChangeRefused", "ModelManager", "compatibility_problem", "production_loader"]
