"""File digests without torch: ``engine info`` and engine sidecars hash files, and neither needs torch."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def file_digest(path: str | Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file."""
    return file_digest(path)[1]
