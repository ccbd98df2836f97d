"""The dynamic batcher: decoded frames from every stream in, one inference batch at a time out.

When the backend is free the batcher takes the largest batch available without waiting, up to
``max_batch``. Only when that batch is not full does it wait for more frames, and never longer
than ``max_delay`` after the oldest waiting frame arrived. While a batch runs, frames keep
arriving, so a busy server forms full batches and an idle one answers a lone frame almost at once.

Every call into the backend (loading, warm-up, inference) happens on one dedicated thread: the
event loop keeps reading, decoding and replying while the model runs, and GPU runtimes see a
single host thread. Run-length encoding of a finished batch runs in the worker pool while the
next batch is already on the backend. Before a batch's answers are set, an optional ``before_answer``
hook makes what they announce durable (coil tracking stores the frames' defects there, on its own
thread); it may fail single frames with :class:`FrameNotRecorded`. Once a batch's frames are answered, an optional ``on_batch``
hook gets the whole batch (camera ids, the frames the model saw, the result): the server's line
feedback (drift statistics, capture) works on it there, vectorised over the batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from engine.backends.base import Backend, InspectionResult
from engine.metadata import ModelMetadata
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")


class FrameExpired(Exception):
    """The frame's call deadline passed before its batch started; it was not run."""


class InferenceFailed(RuntimeError):
    """The backend raised while running the frame's batch."""


class FrameNotRecorded(RuntimeError):
    """The frame was inspected, but what it found could not be made durable: answer UNAVAILABLE, resend."""


@dataclass(frozen=True)
class FrameResult:
    """One frame's inspection: per-class counts, presence and RLE, and where its time went."""

    counts: list[int]
    present: list[bool]
    rles: list[str]
    queue_s: float
    inference_s: float
    postprocess_s: float
    batch_size: int
    model_version: str = ""  # the model that ran the frame's batch


@dataclass(frozen=True)
class FinishedBatch:
    """An inference batch after its frames were answered, for work that follows the answers.

    Attributes:
        camera_ids: the camera of each frame.
        sources: what each frame's caller passed to :meth:`DynamicBatcher.submit` (the request).
        frames: uint8 ``[N, H, W]``, the frames the model saw.
        result: the backend's output for the batch.
        rles: per frame, one RLE per class.
        model_version: the model that ran the batch.
        metadata: that model's metadata (classes, minimum areas, drift reference), so work that
            follows the answers judges the batch by the model that produced it, across swaps.
    """

    camera_ids: list[str]
    sources: list[Any]
    frames: np.ndarray
    result: InspectionResult
    rles: list[list[str]]
    model_version: str = ""
    metadata: ModelMetadata | None = None


@dataclass(eq=False)  # identity: queue removal must not compare frames
class _Pending:
    frame: np.ndarray
    future: asyncio.Future[FrameResult]
    enqueued: float  # time.perf_counter()
    deadline: float | None  # loop.time()
    camera_id: str = ""
    source: Any = None


def _encode(result: InspectionResult) -> tuple[list[list[str]], list[list[int]], list[list[bool]]]:
    return result.rle(), result.counts.tolist(), result.present.tolist()


class DynamicBatcher:
    """Forms inference batches across all streams and runs them on the backend's own thread.

    Args:
        backend: the loaded model; only ever called from the batcher's inference thread.
        max_batch: most frames per batch (lowered to the backend's ``max_batch_size`` if smaller).
        max_delay_s: longest a frame waits for a batch to fill; 0 never waits.
        workers: pool for run-length encoding (shared with decoding).
        metrics: where batch sizes and latencies go.
        inference_thread: the executor the backend runs on (one thread); created when None.
        on_batch: called on the event loop with each :class:`FinishedBatch` once its frames are
            answered; it must return at once (hand heavy work to a thread). Its errors are logged.
        before_answer: awaited with each :class:`FinishedBatch` before its answers are set; returns
            per frame None or the exception to answer that frame with (:class:`FrameNotRecorded`).
            If it raises, every frame of the batch gets :class:`FrameNotRecorded`.
        model_version: names ``backend`` in every :class:`FrameResult` it produces.

    The model can change between batches (:meth:`swap`): each batch takes the backend once, when it
    starts, so it runs entirely on one model.
    """

    def __init__(
        self,
        backend: Backend,
        max_batch: int,
        max_delay_s: float,
        workers: Executor,
        metrics: ServerMetrics,
        inference_thread: ThreadPoolExecutor | None = None,
        on_batch: Callable[[FinishedBatch], None] | None = None,
        before_answer: Callable[[FinishedBatch], Awaitable[Sequence[Exception | None]]] | None = None,
        model_version: str = "",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay must be >= 0, got {max_delay_s}")
        limit = backend.max_batch_size
        if limit is not None and limit < max_batch:
            log.info("event=batch_limit max_batch=%d backend_max_batch=%d", max_batch, limit)
            max_batch = limit
        self.backend = backend
        self.model_version = model_version
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._workers = workers
        self._metrics = metrics
        self._on_batch = on_batch
        self._before_answer = before_answer
        self._owns_inference = inference_thread is None
        self._inference = inference_thread or ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def queued(self) -> int:
        """Frames waiting for a batch (including ones whose stream has gone)."""
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dynamic-batcher")

    def swap(self, backend: Backend, model_version: str) -> Backend:
        """Makes ``backend`` run every batch that starts from now on; returns the previous backend.

        Batches already started finish on the previous one: close it with
        :meth:`run_on_backend_thread`, which runs after them (the inference thread is first in,
        first out). The caller checks ``backend`` accepts ``max_batch`` frames.
        """
        previous, self.backend, self.model_version = self.backend, backend, model_version
        return previous

    async def run_on_backend_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn(*args)`` on the inference thread (loading, warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._inference, fn, *args)

    async def submit(
        self, frame: np.ndarray, deadline: float | None = None, camera_id: str = "", source: Any = None
    ) -> FrameResult:
        """Queues one uint8 ``[H, W]`` frame and waits for its result.

        Args:
            deadline: ``loop.time()`` after which the frame must not be run.
            camera_id: the frame's camera (handed to ``on_batch``).
            source: anything the ``on_batch`` hook needs about the frame (the server's request).

        Raises:
            FrameExpired: the deadline passed before the frame's batch started.
            InferenceFailed: the backend raised on the frame's batch.
        """
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: asyncio.Future[FrameResult] = asyncio.get_running_loop().create_future()
        item = _Pending(frame, future, time.perf_counter(), deadline, camera_id, source)
        self._queue.append(item)
        # Cancelling the caller cancels the future: a frame whose stream has gone leaves the queue
        # at once rather than when the next batch forms.
        future.add_done_callback(lambda f: self._discard(item) if f.cancelled() else None)
        self._arrived.set()
        return await future

    def _discard(self, item: _Pending) -> None:
        try:
            self._queue.remove(item)
        except ValueError:  # already taken into a batch
            return
        self._arrived.set()  # the oldest frame may have gone: the fill deadline moves

    async def close(self) -> None:
        """Stops forming batches and lets finished batches deliver (call once no frame is in flight)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(InferenceFailed("the server stopped before the frame was run"))
        self._queue.clear()
        if self._owns_inference:
            await asyncio.get_running_loop().run_in_executor(None, self._inference.shutdown, True)

    # ------------------------------------------------------------------ the batching loop

    async def _run(self) -> None:
        while True:
            await self._wait_for_batch()
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)

    async def _wait_for_batch(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self.max_delay_s <= 0 or len(self._queue) >= self.max_batch:
                return
            # The delay counts from the oldest frame's arrival: a frame that already waited through
            # a running batch is not held back any further.
            remaining = self._queue[0].enqueued + self.max_delay_s - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()  # a frame arrived, or a cancelled one left
            except TimeoutError:
                if self._queue:
                    return

    def _take_batch(self) -> list[_Pending]:
        now = asyncio.get_running_loop().time()
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            if item.future.done():  # its stream was cancelled
                continue
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(FrameExpired("the call's deadline passed before the frame was run"))
                continue
            batch.append(item)
        return batch

    @staticmethod
    def _infer(backend: Backend, frames: list[np.ndarray]) -> tuple[np.ndarray, InspectionResult, float]:
        stacked = np.stack(frames)
        start = time.perf_counter()
        result = backend.infer(stacked)
        return stacked, result, time.perf_counter() - start

    async def _run_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        for item in batch:
            self._metrics.queue_seconds.observe(started - item.enqueued)
        self._metrics.batch_size.observe(len(batch))
        backend, model_version = self.backend, self.model_version  # once: the batch runs on one model
        try:
            frames, result, inference_s = await loop.run_in_executor(
                self._inference, self._infer, backend, [item.frame for item in batch]
            )
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceFailed("the server stopped while the frame was running"))
            raise
        except Exception as exc:  # noqa: BLE001 - one failing batch must not stop the server
            log.error("event=inference_error batch_size=%d error=%r", len(batch), exc)
            failure = InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
            return
        self._metrics.inference_seconds.observe(inference_s)
        task = loop.create_task(
            self._finish(batch, frames, result, started, inference_s, model_version, backend.metadata)
        )
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish(
        self, batch: list[_Pending], frames: np.ndarray, result: InspectionResult, started: float, inference_s: float,
        model_version: str, metadata: ModelMetadata,
    ) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            rles, counts, present = await loop.run_in_executor(self._workers, _encode, result)
        except Exception as exc:  # noqa: BLE001
            log.error("event=postprocess_error batch_size=%d error=%r", len(batch), exc)
            failure = InferenceFailed(f"post-processing failed: {type(exc).__name__}: {exc}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
            return
        postprocess_s = time.perf_counter() - start
        self._metrics.postprocess_seconds.observe(postprocess_s)
        # Frames whose stream went away are in it too: they were inspected all the same.
        finished = FinishedBatch([item.camera_id for item in batch], [item.source for item in batch], frames,
                                 result, rles, model_version, metadata)
        failures = await self._durable(finished)
        for i, item in enumerate(batch):
            if item.future.done():
                continue
            if failures[i] is not None:
                item.future.set_exception(failures[i])
                continue
            item.future.set_result(
                FrameResult(
                    counts=counts[i],
                    present=present[i],
                    rles=rles[i],
                    queue_s=started - item.enqueued,
                    inference_s=inference_s,
                    postprocess_s=postprocess_s,
                    batch_size=len(batch),
                    model_version=model_version,
                )
            )
        if self._on_batch is not None:
            try:
                self._on_batch(finished)
            except Exception:  # noqa: BLE001 - the answers are out; a failing hook must not stop batching
                log.exception("event=on_batch_error batch_size=%d", len(batch))

    async def _durable(self, finished: FinishedBatch) -> Sequence[Exception | None]:
        """``before_answer``'s verdict per frame; every frame fails when the hook itself fails."""
        size = len(finished.sources)
        if self._before_answer is None:
            return [None] * size
        try:
            failures = list(await self._before_answer(finished))
            if len(failures) != size:
                raise RuntimeError(f"before_answer returned {len(failures)} outcomes for {size} frames")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the frames are answered with it, not lost
            log.exception("event=before_answer_error batch_size=%d", size)
            return [FrameNotRecorded(f"the frame was inspected but its result could not be recorded "
                                     f"({type(exc).__name__}: {exc}); resend it")] * size
        return failures
