"""The coil spool: frames the coil store could not take wait on disk, bounded, until it can.

When the database is down or slow (:class:`coils.store.StoreUnavailable`) the server appends the
batch here (:meth:`Spool.append`) and answers the frames anyway; a drainer writes the spool back,
oldest first (:meth:`Spool.drain`), when the database returns. Nothing is dropped silently: a full
spool raises :class:`SpoolFull` and the caller refuses those frames (the camera resends them).

On disk: segment files ``<sequence>.spool`` in one folder, each a run of entries
``magic | payload length | CRC-32 | payload`` (payload: one batch as JSON,
:meth:`coils.store.FrameComponents.to_dict`). An append is written and ``fsync``-ed before it
returns, so a batch the spool took survives a killed process or a power cut. A crash in the
middle of an append leaves a torn last entry: on restart it is found (short, or its CRC does not
match), logged and cut off; every entry before it is kept. A drain closes the segment being
appended to, writes each closed segment's batches and deletes the segment once all of them were
written: a crash mid-drain writes some batches twice, which the store's idempotent writes absorb.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from coils.records import FrameKey
from coils.store import FrameComponents

log = logging.getLogger(__name__)

MAGIC = b"CSP1"
HEADER = struct.Struct(">4sII")  # magic, payload length, CRC-32 of the payload
SUFFIX = ".spool"
#: A segment being appended to is closed once it is this large (drains also close it).
SEGMENT_BYTES = 8 * 2**20


class SpoolFull(RuntimeError):
    """The spool holds ``max_bytes`` already: the batch was not taken."""


class FrameWriter(Protocol):
    """What a spool drains into (:class:`coils.store.CoilStore`)."""

    def write_frames(self, frames: Sequence[FrameComponents]) -> list[FrameKey]: ...


@dataclass
class _Segment:
    path: Path
    frames: int
    size: int


def encode(frames: Sequence[FrameComponents]) -> bytes:
    """One spool entry (header and payload) holding ``frames``."""
    payload = json.dumps([f.to_dict() for f in frames], separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_segment(path: Path) -> tuple[list[list[FrameComponents]], int]:
    """The batches of a segment file and the size of its good part (a torn or corrupt tail excluded)."""
    data = path.read_bytes()
    batches, offset = [], 0
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            break
        magic, length, crc = HEADER.unpack_from(data, offset)
        payload = data[offset + HEADER.size:offset + HEADER.size + length]
        if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            break
        batches.append([FrameComponents.from_dict(f) for f in json.loads(payload)])
        offset += HEADER.size + length
    return batches, offset


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Spool:
    """A bounded, disk-backed, fsynced queue of frame batches (see the module's doc). Thread-safe.

    Args:
        directory: the spool's folder (created); a new spool on the same folder sees what is left.
        max_bytes: the most the segments may hold together; an append beyond it raises SpoolFull.
    """

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the spool's max_bytes must be > 0, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the segments' list and counts, the append file
        self._drain_lock = threading.Lock()  # one drain at a time
        self._segments = [self._recover(path) for path in sorted(self.directory.glob(f"*{SUFFIX}"))]
        self._next = 1 + max((int(s.path.stem) for s in self._segments), default=0)
        self._active: _Segment | None = None  # segments found on disk are only drained, never appended to
        if self._segments:
            log.info("spool %s: %d frames (%d bytes) left from before", self.directory, self.pending_frames,
                     self.pending_bytes)

    def _recover(self, path: Path) -> _Segment:
        batches, good = read_segment(path)
        size = path.stat().st_size
        if good < size:
            log.warning("spool %s: a torn or corrupt entry at byte %d of %s (%d bytes) was cut off; the %d "
                        "entries before it are kept", self.directory, good, path.name, size - good, len(batches))
            with open(path, "r+b") as handle:
                handle.truncate(good)
                os.fsync(handle.fileno())
        return _Segment(path, sum(len(b) for b in batches), good)

    @property
    def pending_frames(self) -> int:
        """Frames waiting in the spool."""
        with self._lock:
            return sum(s.frames for s in self._segments)

    @property
    def pending_bytes(self) -> int:
        """Bytes the spool's segments hold."""
        with self._lock:
            return sum(s.size for s in self._segments)

    def append(self, frames: Sequence[FrameComponents]) -> None:
        """Appends one batch, on disk (fsynced) before it returns.

        Raises:
            SpoolFull: it would take the spool past ``max_bytes``; nothing was written.
        """
        if not frames:
            return
        entry = encode(frames)
        with self._lock:
            held = sum(s.size for s in self._segments)
            if held + len(entry) > self.max_bytes:
                raise SpoolFull(f"spool {self.directory} is full: {held} of {self.max_bytes} bytes held, a batch "
                                f"of {len(frames)} frames needs {len(entry)} more")
            if self._active is None or self._active.size >= SEGMENT_BYTES:
                self._active = self._new_segment()
            with open(self._active.path, "ab") as handle:
                try:
                    handle.write(entry)
                    handle.flush()
                    os.fsync(handle.fileno())
                except OSError:  # a disk full: cut what was written, or later entries would follow a torn one
                    handle.truncate(self._active.size)
                    raise
            self._active.size += len(entry)
            self._active.frames += len(frames)

    def _new_segment(self) -> _Segment:
        segment = _Segment(self.directory / f"{self._next:012d}{SUFFIX}", 0, 0)
        self._next += 1
        segment.path.touch()
        _fsync_directory(self.directory)
        self._segments.append(segment)
        return segment

    def drain(self, store: FrameWriter, on_late: Callable[[list[FrameKey]], None] | None = None) -> int:
        """Writes the spooled batches to ``store``, oldest first, deleting each segment once it is written.

        Args:
            on_late: called with the keys ``store.write_frames`` returned as late (frames of closed coils).

        Returns:
            The frames of the segments written and deleted.

        Raises:
            StoreUnavailable: from ``store``; what was written before stays deleted, the rest waits.
        """
        written = 0
        with self._drain_lock:
            with self._lock:
                self._active = None  # appends from now on go to a new segment
                closed = list(self._segments)
            for segment in closed:
                batches, _ = read_segment(segment.path)
                for batch in batches:
                    late = store.write_frames(batch)
                    if late and on_late is not None:
                        on_late(late)
                with self._lock:
                    segment.path.unlink()
                    self._segments.remove(segment)
                _fsync_directory(self.directory)
                written += segment.frames
        if written:
            log.info("spool %s: %d frames written to the coil store", self.directory, written)
        return written


__all__ = ["SEGMENT_BYTES", "FrameWriter", "Spool", "SpoolFull", "encode", "read_segment"]
