"""The model repository: versions of the served model, which one is production and which candidate,
and the audit log of every change.

Layout (``server serve --model-repo DIR``)::

    DIR/
      1/model.onnx          # a version is a folder; its name is the version
      2/model.engine        # (+ model.engine.json, the engine's metadata sidecar)
      roles.json            # {"production": "2", "candidate": null, "history": ["1"]}
      audit.jsonl           # one JSON line per load, promote, rollback, unload, failure

Each version folder holds exactly one ``model.{onnx,xml,engine,plan,pt}``; the model's own
metadata stays the truth about classes, sizes and thresholds. ``roles.json`` is replaced atomically
(:func:`engine.files.atomic_write`), so a restarted server comes back with the same roles; without
it the newest version (natural order: ``10`` after ``9``) is production. ``audit.jsonl`` is only
ever appended to, each line flushed to disk before the change it records is announced.

``server serve --model FILE`` is a repository of one (:meth:`ModelRepository.of_file`): its roles
and audit entries live in memory, since the folder of a bare model file is not the server's to write.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.files import atomic_write
from engine.hashing import file_sha256

log = logging.getLogger(__name__)

STATE_FILE = "roles.json"
AUDIT_FILE = "audit.jsonl"
MODEL_STEM = "model"
#: The model file suffixes a version folder may hold (engine.backends picks the runtime by suffix).
MODEL_SUFFIXES = (".onnx", ".xml", ".engine", ".plan", ".pt")
OUTCOMES = ("ok", "refused", "failed")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RepositoryError(ValueError):
    """The repository, a version in it or its state file is not what the server needs; says what."""


def check_version_name(version: str) -> str:
    """``version`` if it can name a version folder (letters, digits, ``._-``, no path), else raises."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise RepositoryError(f"version {version!r}: expected 1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    return version


def _natural_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", version) if part)


def _strict(cls: type, data: Any, what: str) -> dict[str, Any]:
    """``data`` as keyword arguments of dataclass ``cls``: a missing or unknown key is an error."""
    if not isinstance(data, dict):
        raise RepositoryError(f"{what}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    if set(data) != names:
        raise RepositoryError(f"{what}: expected keys {sorted(names)}, got {sorted(data)}")
    return data


@dataclass(frozen=True)
class Roles:
    """Who serves: the production version, the candidate (or None), and the earlier productions,
    oldest first (``Rollback`` returns to the last of them)."""

    production: str
    candidate: str | None = None
    history: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Any, what: str = STATE_FILE) -> Roles:
        values = _strict(cls, data, what)
        history = values["history"]
        if not isinstance(history, list) or not all(isinstance(v, str) for v in history):
            raise RepositoryError(f"{what}: 'history' must be a list of versions")
        if values["candidate"] is not None:
            check_version_name(values["candidate"])
        return cls(check_version_name(values["production"]), values["candidate"], tuple(history))

    def to_dict(self) -> dict[str, Any]:
        return {"production": self.production, "candidate": self.candidate, "history": list(self.history)}


@dataclass(frozen=True)
class AuditEntry:
    """One line of the audit log.

    Attributes:
        time: ISO 8601 UTC.
        action: load, unload, promote, rollback, start, shadow.
        version: the version acted on ("" when there was none, e.g. a rollback with no history).
        sha256: the version's model file digest ("" when it could not be read).
        who: the caller (certificate subject, "token", or the loopback peer).
        outcome: ok, refused (the request was wrong or not allowed) or failed (loading failed).
        why: the reason for a refusal or failure, "" when ok.
    """

    time: str
    action: str
    version: str
    sha256: str
    who: str
    outcome: str
    why: str = ""

    @classmethod
    def now(cls, action: str, version: str, sha256: str, who: str, outcome: str, why: str = "") -> AuditEntry:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        return cls(stamp, action, version, sha256, who, outcome, why)

    @classmethod
    def from_dict(cls, data: Any, what: str = AUDIT_FILE) -> AuditEntry:
        return cls(**_strict(cls, data, what))


@dataclass
class ModelRepository:
    """The versions of one served model, their roles and their audit log.

    Use :meth:`open` (a repository folder) or :meth:`of_file` (one model file). Thread-safe: the
    state file and the audit log are written under one lock.
    """

    root: Path | None
    single_file: Path | None = None
    _roles: Roles | None = field(default=None, repr=False)
    _memory_audit: list[AuditEntry] = field(default_factory=list, repr=False)
    _digests: dict[tuple[Path, int, int], str] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, root: str | Path) -> ModelRepository:
        """The repository in folder ``root``; its roles are read (or chosen and written) now.

        Raises:
            RepositoryError: no folder, no version in it, a malformed state file, or a state
                naming a version that is not there.
        """
        root = Path(root)
        if not root.is_dir():
            raise RepositoryError(f"--model-repo {root}: no such folder")
        repo = cls(root)
        repo._roles = repo._read_roles()
        return repo

    @classmethod
    def of_file(cls, path: str | Path) -> ModelRepository:
        """A repository of one: ``path`` is its only version (named by the file name) and production."""
        path = Path(path)
        if not path.is_file():
            raise RepositoryError(f"--model {path}: no such model file")
        return cls(None, path, Roles(production=path.name))

    @property
    def is_single_file(self) -> bool:
        return self.single_file is not None

    def versions(self) -> list[str]:
        """Every version folder holding a model file, in natural order (``2`` before ``10``)."""
        if self.single_file is not None:
            return [self.single_file.name]
        assert self.root is not None
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)
                 and any((p / (MODEL_STEM + s)).is_file() for s in MODEL_SUFFIXES)]
        return sorted(found, key=_natural_key)

    def model_file(self, version: str) -> Path:
        """The model file of ``version``.

        Raises:
            RepositoryError: no such version, or its folder holds no model file or several.
        """
        if self.single_file is not None:
            if version != self.single_file.name:
                raise RepositoryError(f"version {version!r}: this server serves one model file "
                                      f"({self.single_file.name}); start it with --model-repo to load others")
            return self.single_file
        assert self.root is not None
        folder = self.root / check_version_name(version)
        files = [folder / (MODEL_STEM + s) for s in MODEL_SUFFIXES if (folder / (MODEL_STEM + s)).is_file()]
        if not files:
            raise RepositoryError(f"version {version!r}: {folder} holds no model file "
                                  f"(expected one of {', '.join(MODEL_STEM + s for s in MODEL_SUFFIXES)})")
        if len(files) > 1:
            raise RepositoryError(f"version {version!r}: {folder} holds several model files "
                                  f"({', '.join(f.name for f in files)}); keep exactly one")
        return files[0]

    def sha256(self, version: str) -> str:
        """The digest of ``version``'s model file, "" when there is none to read (kept while the
        file's size and modification time stay the same: every audit entry names one)."""
        try:
            path = self.model_file(version)
            stat = path.stat()
            key = (path, stat.st_size, stat.st_mtime_ns)
            if key not in self._digests:
                self._digests[key] = file_sha256(path)
            return self._digests[key]
        except (RepositoryError, OSError):
            return ""

    # ------------------------------------------------------------------ roles

    @property
    def roles(self) -> Roles:
        assert self._roles is not None
        return self._roles

    def set_roles(self, roles: Roles) -> None:
        """Makes ``roles`` the repository's, durably (the state file is replaced atomically)."""
        with self._lock:
            if self.root is not None:
                atomic_write(self.root / STATE_FILE, json.dumps(roles.to_dict(), indent=2) + "\n")
            self._roles = roles

    def _read_roles(self) -> Roles:
        assert self.root is not None
        state = self.root / STATE_FILE
        versions = self.versions()
        if not state.exists():
            if not versions:
                raise RepositoryError(f"--model-repo {self.root}: no version folder with a model file "
                                      f"(expected {self.root}/<version>/model.onnx or another of {MODEL_SUFFIXES})")
            roles = Roles(production=versions[-1])
            atomic_write(state, json.dumps(roles.to_dict(), indent=2) + "\n")
            log.info("event=roles_chosen production=%s state=%s", roles.production, state)
            return roles
        try:
            roles = Roles.from_dict(json.loads(state.read_text(encoding="utf-8")), str(state))
        except json.JSONDecodeError as exc:
            raise RepositoryError(f"{state}: not JSON ({exc})") from None
        if roles.production not in versions:
            raise RepositoryError(f"{state}: production version {roles.production!r} is not in the repository "
                                  f"(versions: {', '.join(versions) or 'none'})")
        return roles

    # ------------------------------------------------------------------ audit log

    def record(self, entry: AuditEntry) -> None:
        """Appends ``entry`` to the audit log and syncs it to disk before returning."""
        line = json.dumps(asdict(entry), separators=(",", ":")) + "\n"
        with self._lock:
            if self.root is None:
                self._memory_audit.append(entry)
                return
            fd = os.open(self.root / AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)

    def audit(self, last: int | None = None) -> list[AuditEntry]:
        """The audit log's entries, oldest first (the ``last`` ones only when given)."""
        if self.root is None:
            entries = list(self._memory_audit)
        else:
            path = self.root / AUDIT_FILE
            lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
            entries = [AuditEntry.from_dict(json.loads(text), f"{path} line {i}")
                       for i, text in enumerate(lines, 1) if text.strip()]
        return entries if last is None else entries[-last:] if last > 0 else []


__all__ = ["AUDIT_FILE", "MODEL_SUFFIXES", "STATE_FILE", "AuditEntry", "ModelRepository", "RepositoryError",
           "Roles", "check_version_name"]
