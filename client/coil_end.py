"""Ending coils from the camera side: ``EndCoil`` once every frame of a coil is answered.

On a line the PLC says when a coil's tail has passed; ``server client --line`` plays that part: a
:class:`CoilEnder` counts each coil's answered frames over all cameras and, once the last one is
answered, calls ``EndCoil(coil_id, length_mm)``. UNAVAILABLE (the server restarting, its database
down) is retried with backoff for up to ``give_up_s``; a server without coil tracking
(FAILED_PRECONDITION) is noted once and is no failure.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class CoilEnds:
    """What ending the coils gave: each ended coil's summary, the coils that could not be ended."""

    summaries: dict[str, Any] = field(default_factory=dict)  # coil id -> inspection.v1.CoilSummary
    failed: list[tuple[str, str]] = field(default_factory=list)  # (coil id, why)
    untracked: bool = False  # the server does not track coils (no --coil-db)


def coil_lengths(line: Path, shots: Mapping[str, Sequence[Any]]) -> dict[str, float | None]:
    """Per coil, the end of its furthest frame (position + the camera's frame length), from the line
    folder's ``line.yaml``; None per coil when the folder has no line description."""
    from coils.line import load_line
    from coils.line_folder import LINE_FILE, frames_file

    line_file = frames_file(line).parent / LINE_FILE
    geometry = load_line(line_file) if line_file.is_file() else None
    lengths: dict[str, float | None] = {}
    for camera_id, frames in shots.items():
        step = geometry.camera(camera_id).frame_length_mm if geometry is not None else None
        for shot in frames:
            if not shot.coil_id:
                continue
            end = None if step is None else shot.position_mm + step
            previous = lengths.get(shot.coil_id)
            lengths[shot.coil_id] = end if previous is None or end is None else max(previous, end)
    return lengths


class CoilEnder:
    """Calls ``EndCoil`` for each coil once all its frames (over every camera) are answered.

    Args:
        channel: the cameras' channel.
        frames_per_coil: how many frames each coil has, over all cameras.
        lengths: each coil's length to send (None: the server takes its furthest frame's end).
        give_up_s: how long UNAVAILABLE is retried.
    """

    def __init__(self, channel: Any, frames_per_coil: Mapping[str, int], lengths: Mapping[str, float | None],
                 give_up_s: float | None = 60.0) -> None:
        from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

        self._stub = pb_grpc.InspectionServiceStub(channel)
        self._left = Counter(frames_per_coil)
        self._lengths = dict(lengths)
        self._give_up_s = give_up_s
        self._tasks: list[asyncio.Task[None]] = []
        self.ends = CoilEnds()

    def answered(self, coil_id: str) -> None:
        """One frame of ``coil_id`` was answered (an error answer included); ends the coil after its last."""
        if not coil_id or coil_id not in self._left:
            return
        self._left[coil_id] -= 1
        if self._left[coil_id] == 0:
            self._tasks.append(asyncio.get_running_loop().create_task(self._end(coil_id)))

    async def finish(self) -> CoilEnds:
        """Waits for every EndCoil started; coils with frames never answered are listed as failed."""
        await asyncio.gather(*self._tasks)
        self.ends.failed += [(coil, f"{left} of its frames were never answered; not ended")
                             for coil, left in sorted(self._left.items()) if left > 0]
        return self.ends

    async def _end(self, coil_id: str) -> None:
        import grpc

        from client.camera import Backoff
        from protos.inspection.v1 import inspection_pb2 as pb

        request = pb.EndCoilRequest(coil_id=coil_id)
        if self._lengths.get(coil_id) is not None:
            request.length_mm = self._lengths[coil_id]
        backoff, rng, attempt, started = Backoff(give_up_s=self._give_up_s), random.Random(), 0, time.monotonic()
        while True:
            try:
                self.ends.summaries[coil_id] = await self._stub.EndCoil(request, timeout=30)
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    if not self.ends.untracked:
                        log.warning("the server does not track coils (%s); coils are not ended", exc.details())
                    self.ends.untracked = True
                    return
                waited = time.monotonic() - started
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or (
                        self._give_up_s is not None and waited >= self._give_up_s):
                    self.ends.failed.append((coil_id, f"EndCoil: {code.name}: {exc.details()}"))
                    return
            await asyncio.sleep(backoff.delay(attempt, rng))
            attempt += 1


__all__ = ["CoilEnder", "CoilEnds", "coil_lengths"]
