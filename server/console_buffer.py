"""The console's frame buffer: per camera, references to its latest frame and last defective frames,
and its defect-rate buckets, filled by the server's batch listener (:meth:`CameraBuffer.observe`).

At most ``max_cameras`` cameras are kept: a camera that sends its first frame while the buffer is
full takes the place of the camera seen least recently (as the drift monitor does), so a retired
camera or a junk id never keeps a real one off the page. The ids of cameras dropped this way are
remembered (at most :data:`HIDDEN_LIMIT`) so the page can say how many cameras it does not show.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from server.batcher import FinishedBatch

log = logging.getLogger(__name__)

#: Frames of one camera observed within this many seconds are ordered by frame id.
REORDER_S = 1.0
#: Ids of cameras not shown that the console remembers (to count them); older ones are forgotten.
HIDDEN_LIMIT = 4096
#: Camera evictions are logged at most this often (seconds).
EVICTION_LOG_INTERVAL_S = 60.0


@dataclass(eq=False)
class Shot:
    """One inspected frame as the console keeps it: references, no encoding."""

    seq: int
    camera_id: str
    frame_id: int
    time: float  # time.time()
    frame: np.ndarray  # uint8 [H, W]: a row of the batch (latest) or a copy (thumbnails)
    rles: list[str]
    counts: np.ndarray  # int [C]
    present: np.ndarray  # bool [C]
    model_version: str = ""  # the model that answered the frame


def newer(shot: Shot, other: Shot) -> bool:
    """Whether ``shot`` is a later frame of its camera than ``other``.

    Batches finish in any order (their RLE runs in a pool), so a frame observed later may be an
    earlier one: by frame id, unless ``other`` was observed over REORDER_S before (the camera
    restarted its numbering)."""
    return shot.frame_id > other.frame_id or shot.time - other.time >= REORDER_S


def keep_in_order(kept: list[Shot], shot: Shot, limit: int) -> None:
    """Inserts ``shot`` into ``kept`` (oldest first) in frame order, keeping the newest ``limit``."""
    i = len(kept)
    while i > 0 and not newer(shot, kept[i - 1]):
        i -= 1
    kept.insert(i, shot)
    if len(kept) > limit:
        del kept[0]


@dataclass(eq=False)
class Camera:
    """What the console keeps of one camera."""

    camera_id: str
    num_classes: int
    latest: Shot | None = None
    shown: Shot | None = None  # the latest frame whose image is ready: what the page shows
    shown_at: float = 0.0  # time.monotonic() it was shown
    seen: float = 0.0  # time.monotonic() of its last frame
    defective: list[Shot] = field(default_factory=list)  # the last defective frames, oldest first
    frames: int = 0
    defective_frames: np.ndarray = field(default=None)  # type: ignore[assignment]  # int64 [C]
    buckets: deque[list[Any]] = field(default_factory=deque)  # [bucket start, frames, defects [C]]

    def __post_init__(self) -> None:
        self.defective_frames = np.zeros(self.num_classes, np.int64)


class CameraBuffer:
    """The cameras the console shows, filled from finished batches (O(1) per frame)."""

    def __init__(self, max_cameras: int, thumbnails: int, bucket_s: float, history_s: float) -> None:
        self.max_cameras = max_cameras
        self.thumbnails = thumbnails
        self.bucket_s = bucket_s
        self.history_s = history_s
        self.cameras: dict[str, Camera] = {}  # in the order they first appeared
        self.hidden: OrderedDict[str, None] = OrderedDict()  # ids dropped to make room, least recent first
        self.evicted = 0
        self._seq = 0
        self._last_eviction_log = -EVICTION_LOG_INTERVAL_S

    def observe(self, batch: FinishedBatch) -> None:
        """Keeps references to a finished batch's frames; the server's batch listener."""
        now, seen = time.time(), time.monotonic()
        present = batch.result.present
        counts = batch.result.counts
        flagged = present.any(axis=1)
        for i, camera_id in enumerate(batch.camera_ids):
            camera = self.cameras.get(camera_id) or self._add_camera(camera_id, present.shape[1])
            camera.seen = seen
            self._seq += 1
            shot = Shot(self._seq, camera_id, int(getattr(batch.sources[i], "frame_id", -1)), now, batch.frames[i],
                        batch.rles[i], counts[i], present[i], batch.model_version)
            if camera.latest is None or newer(shot, camera.latest):
                camera.latest = shot
            camera.frames += 1
            bucket = self._bucket(camera, now)
            bucket[1] += 1
            if flagged[i]:
                bucket[2] += present[i]
                camera.defective_frames += present[i]
                if self.thumbnails:
                    # A copy: a kept thumbnail must not pin its whole batch.
                    keep_in_order(camera.defective, Shot(shot.seq, camera_id, shot.frame_id, now, batch.frames[i].copy(),
                                                         shot.rles, shot.counts, shot.present, shot.model_version),
                                   self.thumbnails)

    def _add_camera(self, camera_id: str, num_classes: int) -> Camera:
        if len(self.cameras) >= self.max_cameras:
            self._evict(min(self.cameras.values(), key=lambda c: c.seen).camera_id, camera_id)
        self.hidden.pop(camera_id, None)
        camera = self.cameras[camera_id] = Camera(camera_id, num_classes)
        return camera

    def _evict(self, camera_id: str, newcomer: str) -> None:
        """Drops the camera seen least recently for ``newcomer``; remembers its id (bounded)."""
        del self.cameras[camera_id]
        self.evicted += 1
        self.hidden[camera_id] = None
        while len(self.hidden) > HIDDEN_LIMIT:
            self.hidden.popitem(last=False)
        now = time.monotonic()
        if now - self._last_eviction_log >= EVICTION_LOG_INTERVAL_S:
            self._last_eviction_log = now
            log.warning("event=console_camera_evicted max_cameras=%d evicted=%d: the console shows at most %d "
                        "cameras; dropped %.80r (least recently seen) for %.80r", self.max_cameras, self.evicted,
                        self.max_cameras, camera_id, newcomer)

    def _bucket(self, camera: Camera, now: float) -> list[Any]:
        start = now - now % self.bucket_s
        if not camera.buckets or camera.buckets[-1][0] != start:
            camera.buckets.append([start, 0, np.zeros(camera.num_classes, np.int64)])
            while camera.buckets[0][0] < now - self.history_s:
                camera.buckets.popleft()
        return camera.buckets[-1]

    def retained(self) -> Iterable[Shot]:
        """Every shot the buffer holds (latest, shown and defective frames of every camera)."""
        for camera in self.cameras.values():
            yield from (s for s in (camera.latest, camera.shown) if s is not None)
            yield from camera.defective


__all__ = ["Camera", "CameraBuffer", "HIDDEN_LIMIT", "Shot", "keep_in_order", "newer"]
