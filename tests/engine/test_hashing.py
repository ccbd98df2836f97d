"""``engine.hashing``: file digests without torch."""

from __future__ import annotations

import hashlib
from pathlib import Path

from engine.hashing import file_digest, file_sha256


def test_digest_of_a_multi_block_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > 2 MiB: several read blocks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_digest(path) == (len(data), hashlib.sha256(data).hexdigest())
