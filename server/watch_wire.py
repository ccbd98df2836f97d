"""How a call's frames travel from the serving process to the line watch's process (:class:`WatchFrames`).

:class:`server.coil_watch.WatchProcess` sends the frames stored since its last call over a pipe. Pickled as
objects, each :class:`coils.records.Component` cost a Python ``__reduce__`` call and a dozen pickled values in
the serving process, and a Python call to be made again in the watch's: at ``bench stream``'s ~30 components a
frame, most of the line monitor's CPU in the serving process. Here the frames go as lists (one entry per
frame) and their components as columns per coil (:class:`coils.columns.ComponentColumns`: numpy arrays of the
scalars, the packed masks as they were made), read with C-level getters and pickled as a few objects; the
watch's process makes its components from the columns in one loop, their masks left packed until read, as
before. The watch's results are the same: it is given the same frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter

from coils.columns import ComponentColumns
from coils.records import Component, FrameKey
from coils.store import FrameComponents

_COIL, _CAMERA, _FRAME = attrgetter("key.coil_id"), attrgetter("key.camera_id"), attrgetter("key.frame_id")
_POSITION, _RECEIVED = attrgetter("position_mm"), attrgetter("received_unix_s")


@dataclass(frozen=True)
class WatchFrames:
    """One call's frames, in order (a frame may come twice: a resend), one entry per frame in each list; their
    components as columns per coil, in frame order (``counts[i]`` of frame ``i``)."""

    coil_ids: list[str]
    camera_ids: list[str]
    frame_ids: list[int]
    positions_mm: list[float]
    received_unix_s: list[float]
    counts: list[int]
    components: dict[str, ComponentColumns]

    @classmethod
    def of(cls, frames: Sequence[FrameComponents]) -> WatchFrames:
        """The wire form of ``frames`` (what the serving process sends)."""
        by_coil: dict[str, list[Component]] = {}
        for frame in frames:
            if frame.components:
                by_coil.setdefault(frame.key.coil_id, []).extend(frame.components)
        return cls(list(map(_COIL, frames)), list(map(_CAMERA, frames)), list(map(_FRAME, frames)),
                   list(map(_POSITION, frames)), list(map(_RECEIVED, frames)), [len(f.components) for f in frames],
                   {coil_id: ComponentColumns.of(coil_id, found) for coil_id, found in by_coil.items()})

    def __len__(self) -> int:
        return len(self.coil_ids)

    def frames(self) -> list[FrameComponents]:
        """The frames again (what the watch's process takes), their components' masks packed until read.

        Raises:
            ValueError: a packed mask is not the size its shape needs.
        """
        parts = {coil_id: iter(columns.packed_components()) for coil_id, columns in self.components.items()}
        frames = []
        for coil_id, camera_id, frame_id, position, received, count in zip(
                self.coil_ids, self.camera_ids, self.frame_ids, self.positions_mm, self.received_unix_s, self.counts):
            found = tuple(islice(parts[coil_id], count)) if count else ()
            # the components' key object where it is the frame's (the record builder checks it by identity first)
            key = found[0].key if found else None
            if key is None or key.frame_id != frame_id or key.camera_id != camera_id:
                key = FrameKey(coil_id, camera_id, frame_id)
            frames.append(FrameComponents(key, position, found, received))
        return frames


__all__ = ["WatchFrames"]
