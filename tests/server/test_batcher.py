"""The dynamic batcher on the real tiny exported model: batch forming, deadlines, cancellation."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from server.batcher import DynamicBatcher, FrameExpired
from server.metrics import ServerMetrics


def run_batcher(backend, scenario, max_batch: int, max_delay_s: float, on_batch=None):
    """Runs ``scenario(batcher)`` against a started batcher; returns its result and the metrics."""
    metrics = ServerMetrics()

    async def main():
        with ThreadPoolExecutor(2) as workers:
            batcher = DynamicBatcher(backend, max_batch, max_delay_s, workers, metrics, on_batch=on_batch)
            batcher.start()
            try:
                async with asyncio.timeout(30):  # a batcher that waited its whole delay would trip this
                    return await scenario(batcher)
            finally:
                await batcher.close()

    return asyncio.run(main()), metrics


def batches_run(metrics: ServerMetrics) -> tuple[int, int]:
    """(batches, frames) that reached the backend."""
    values = {s.name: s.value for m in metrics.batch_size.collect() for s in m.samples}
    return int(values["inspection_batch_size_count"]), int(values["inspection_batch_size_sum"])


def test_takes_the_largest_batch_available_and_matches_the_backend(direct_backend, camera_frames, direct_output):
    frames = camera_frames[:20]

    async def scenario(batcher):
        # Every submit queues its frame before the batcher's loop runs again, so all 20 are waiting.
        return await asyncio.gather(*(batcher.submit(f) for f in frames))

    results, metrics = run_batcher(direct_backend, scenario, max_batch=8, max_delay_s=0.0)
    assert [r.batch_size for r in results] == [8] * 16 + [4] * 4
    assert batches_run(metrics) == (3, 20)
    for i, r in enumerate(results):
        assert r.counts == direct_output["counts"][i]
        assert r.present == direct_output["present"][i]
        assert r.rles == direct_output["rles"][i]


def test_a_full_batch_does_not_wait_for_the_delay(direct_backend, camera_frames):
    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit(f) for f in camera_frames[:4]))

    # With a 60 s delay, anything but "full: run now" would trip the 30 s timeout.
    results, _ = run_batcher(direct_backend, scenario, max_batch=4, max_delay_s=60.0)
    assert [r.batch_size for r in results] == [4] * 4


def test_a_partial_batch_waits_for_frames_arriving_within_the_delay(direct_backend, camera_frames):
    async def scenario(batcher):
        first = asyncio.ensure_future(batcher.submit(camera_frames[0]))
        await asyncio.sleep(0.05)  # the batcher is now holding frame 0, waiting for a second one
        assert not first.done()
        second = await batcher.submit(camera_frames[1])
        return [await first, second]

    results, metrics = run_batcher(direct_backend, scenario, max_batch=2, max_delay_s=60.0)
    assert [r.batch_size for r in results] == [2, 2]
    assert batches_run(metrics) == (1, 2)


def test_a_frame_past_its_deadline_is_not_run(direct_backend, camera_frames):
    async def scenario(batcher):
        past = asyncio.get_running_loop().time() - 1.0
        with pytest.raises(FrameExpired):
            await batcher.submit(camera_frames[0], deadline=past)
        return await batcher.submit(camera_frames[1], deadline=asyncio.get_running_loop().time() + 30)

    result, metrics = run_batcher(direct_backend, scenario, max_batch=4, max_delay_s=0.0)
    assert result.batch_size == 1
    assert batches_run(metrics) == (1, 1)  # only the frame within its deadline reached the backend


def test_a_cancelled_frame_leaves_the_queue_and_is_not_run(direct_backend, camera_frames):
    async def scenario(batcher):
        doomed = asyncio.ensure_future(batcher.submit(camera_frames[0]))
        await asyncio.sleep(0.05)
        assert batcher.queued == 1
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        assert batcher.queued == 0  # removed at once, not when the 60 s delay runs out
        # Two new frames make a full batch of 2: the cancelled one is not part of it.
        return await asyncio.gather(batcher.submit(camera_frames[1]), batcher.submit(camera_frames[2]))

    results, metrics = run_batcher(direct_backend, scenario, max_batch=2, max_delay_s=60.0)
    assert [r.batch_size for r in results] == [2, 2]
    assert batches_run(metrics) == (1, 2)


def test_backend_failure_fails_the_batch_not_the_batcher(direct_backend, camera_frames):
    from server.batcher import InferenceFailed

    async def scenario(batcher):
        wrong = np.zeros((10, 10), dtype=np.uint8)  # the backend's own frame check rejects it
        with pytest.raises(InferenceFailed, match="frames must have shape"):
            await batcher.submit(wrong)
        return await batcher.submit(camera_frames[0])

    result, _ = run_batcher(direct_backend, scenario, max_batch=4, max_delay_s=0.0)
    assert result.batch_size == 1


def test_finished_batches_reach_the_hook_and_a_failing_hook_changes_no_answer(
    direct_backend, camera_frames, direct_output
):
    seen = []

    def on_batch(batch):
        seen.append(batch)
        if len(seen) == 1:
            raise RuntimeError("a broken line-feedback hook")

    async def scenario(batcher):
        return await asyncio.gather(
            *(batcher.submit(f, camera_id=f"cam{i % 2}", source=i) for i, f in enumerate(camera_frames[:10]))
        )

    results, _ = run_batcher(direct_backend, scenario, max_batch=4, max_delay_s=0.0, on_batch=on_batch)
    for i, r in enumerate(results):  # the hook raising on the first batch changed nothing
        assert (r.counts, r.present, r.rles) == (
            direct_output["counts"][i], direct_output["present"][i], direct_output["rles"][i]
        )
    # Batches finish on worker threads: the hook sees each once, not necessarily in batch order.
    assert sorted(b.sources for b in seen) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for batch in seen:
        assert batch.camera_ids == [f"cam{i % 2}" for i in batch.sources]
        np.testing.assert_array_equal(batch.frames, camera_frames[batch.sources])
        assert batch.result.counts.tolist() == [direct_output["counts"][i] for i in batch.sources]
        assert batch.rles == [direct_output["rles"][i] for i in batch.sources]
