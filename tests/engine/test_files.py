"""engine.files: the one atomic file replacement."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from engine.files import atomic_path, atomic_write


def test_atomic_write_replaces_bytes_text_and_callback_content(tmp_path: Path):
    target = tmp_path / "sub" / "model.onnx"
    atomic_write(target, b"first", make_parents=True)
    assert target.read_bytes() == b"first"
    atomic_write(target, "line\r\n")  # text as is: no newline translation
    assert target.read_bytes() == b"line\r\n"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"from a writer"))
    assert target.read_bytes() == b"from a writer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "folds.csv"
    target.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["folds.csv"]


def test_the_temporary_is_hidden_beside_the_target_and_readable_like_a_plain_file(tmp_path: Path):
    target = tmp_path / "image.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".image.png.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"png")
        assert not target.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
