"""The one way a file is replaced: written whole to a temporary file beside it, then renamed onto it.

A reader (a server loading a model, a second ``trainer fit``, a crash-restarted process) sees the
old file or the new one, never half of one. The temporary file is unique to the writer (several
processes may write the same path), hidden (``.NAME.<unique>.tmp``, so folder listings and
``*.tmp`` clean-ups find it), flushed to disk before the rename, and removed if the write fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a fresh temporary path beside ``path`` to write; on a clean exit it is synced to disk and
    renamed onto ``path``, on an exception removed (and the exception raised).

    For writers that need the temporary path itself (``torch.save``, ``savefig``) or that do more
    between writing and renaming; :func:`atomic_write` covers the plain cases.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    # O_EXCL: never another writer's file; mode 0o666 under the umask, as a plain open() would give.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, content: bytes | str | Callable[[Path], object], encoding: str = "utf-8",
                 make_parents: bool = False) -> Path:
    """Replaces ``path`` atomically with ``content``: bytes, text (written as is, no newline
    translation), or a function that writes the file at the temporary path it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if callable(content):
            content(tmp)
        elif isinstance(content, str):
            with open(tmp, "w", encoding=encoding, newline="") as f:
                f.write(content)
        else:
            tmp.write_bytes(content)
    return path
