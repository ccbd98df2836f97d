"""The coil spool: batches survive a restart, a torn last entry is cut off (everything before it kept),
a full spool refuses a batch, and a drain writes everything oldest first into a real coil store, once."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import pytest

from coils import schema
from coils.records import FrameKey
from coils.spool import SUFFIX, Spool, SpoolFull, encode
from coils.store import CoilStore, StoreUnavailable
from tests.coils.test_records import two_cameras
from tests.coils.test_store import coil_frames, table_count, truth


@pytest.fixture
def line():
    return two_cameras()


def batches_of(frames, size: int = 4):
    return [frames[i:i + size] for i in range(0, len(frames), size)]


def test_batches_survive_a_restart_and_drain_oldest_first_into_the_store(tmp_path, line) -> None:
    frames = coil_frames(line)
    spool = Spool(tmp_path / "spool", max_bytes=10 * 2**20)
    for batch in batches_of(frames):
        spool.append(batch)
    assert spool.pending_frames == len(frames) and spool.pending_bytes > 0
    again = Spool(tmp_path / "spool", max_bytes=10 * 2**20)  # a restarted server
    assert again.pending_frames == len(frames) and again.pending_bytes == spool.pending_bytes
    store = CoilStore.open(f"sqlite:///{tmp_path / 'coils.db'}", line)
    assert again.drain(store) == len(frames)
    assert again.pending_frames == 0 and again.pending_bytes == 0 and not list((tmp_path / "spool").glob(f"*{SUFFIX}"))
    assert store.close_coil("C1", None, "end").frames == len(frames) and store.get_coil("C1")[1] == truth(line)
    summary = store.get_coil("C1")[0]
    assert summary.opened_unix_s == 1000.0  # the frames' own receive times travel through the spool
    again.append(frames[:1])  # appends go on after a drain
    assert again.pending_frames == 1


def test_a_torn_last_entry_is_cut_off_and_everything_before_it_kept(tmp_path, line, caplog) -> None:
    frames = coil_frames(line)
    spool = Spool(tmp_path, max_bytes=10 * 2**20)
    for batch in batches_of(frames[:12]):
        spool.append(batch)
    (segment,) = tmp_path.glob(f"*{SUFFIX}")
    kept = segment.stat().st_size
    torn = encode(frames[12:16])
    with open(segment, "ab") as handle:  # the process died in the middle of writing this entry
        handle.write(torn[:len(torn) // 2])
    with caplog.at_level(logging.WARNING, logger="coils.spool"):
        restarted = Spool(tmp_path, max_bytes=10 * 2**20)
    assert "a torn or corrupt entry at byte" in caplog.text and "the 3 entries before it are kept" in caplog.text
    assert restarted.pending_frames == 12 and segment.stat().st_size == kept
    restarted.append(frames[12:])  # after the cut: a new segment, read back whole
    assert Spool(tmp_path, max_bytes=10 * 2**20).pending_frames == len(frames)
    store = CoilStore.open(f"sqlite:///{tmp_path / 'db' / 'coils.db'}", line)
    assert restarted.drain(store) == len(frames) and store.get_coil("C1")[1] == truth(line)


def test_a_corrupt_entry_is_cut_off_too(tmp_path, line) -> None:
    frames = coil_frames(line)
    spool = Spool(tmp_path, max_bytes=10 * 2**20)
    spool.append(frames[:4])
    spool.append(frames[4:8])
    (segment,) = tmp_path.glob(f"*{SUFFIX}")
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the last entry's payload: its CRC no longer matches
    segment.write_bytes(bytes(data))
    assert Spool(tmp_path, max_bytes=10 * 2**20).pending_frames == 4


def test_a_full_spool_refuses_the_batch_and_takes_again_once_drained(tmp_path, line) -> None:
    frames = coil_frames(line)
    size = len(encode(frames[:4]))
    spool = Spool(tmp_path / "spool", max_bytes=2 * size + 10)
    spool.append(frames[:4])
    spool.append(frames[4:8])
    with pytest.raises(SpoolFull, match=r"is full: \d+ of \d+ bytes held, a batch of 4 frames needs"):
        spool.append(frames[8:12])
    assert spool.pending_frames == 8 and Spool(tmp_path / "spool", max_bytes=1).pending_frames == 8
    store = CoilStore.open(f"sqlite:///{tmp_path / 'coils.db'}", line)
    assert spool.drain(store) == 8
    spool.append(frames[8:12])
    assert spool.pending_frames == 4


def test_a_crash_mid_drain_writes_again_without_doubling(tmp_path, line) -> None:
    frames = coil_frames(line)
    spool = Spool(tmp_path / "spool", max_bytes=10 * 2**20)
    for batch in batches_of(frames):
        spool.append(batch)
    shutil.copytree(tmp_path / "spool", tmp_path / "before")
    store = CoilStore.open(f"sqlite:///{tmp_path / 'coils.db'}", line)
    spool.drain(store)
    components = table_count(store, schema.components)
    # The server died after the writes, before the segment was deleted: the restarted one drains it again.
    assert Spool(tmp_path / "before", max_bytes=10 * 2**20).drain(store) == len(frames)
    assert table_count(store, schema.frames) == len(frames) and table_count(store, schema.components) == components
    assert store.close_coil("C1", None, "end").frames == len(frames)


def test_late_frames_in_the_spool_are_reported(tmp_path, line) -> None:
    frames = coil_frames(line)
    store = CoilStore.open(f"sqlite:///{tmp_path / 'coils.db'}", line)
    store.write_frames(frames)
    store.close_coil("C1", None, "end")
    spool = Spool(tmp_path / "spool", max_bytes=10 * 2**20)
    late = dataclasses.replace(frames[0], key=FrameKey("C1", "cam0", 40))
    spool.append([frames[1], late])
    reported: list[FrameKey] = []
    assert spool.drain(store, on_late=reported.extend) == 2 and reported == [late.key]


def test_a_drain_into_a_database_that_is_down_keeps_everything(tmp_path, line, postgres_url) -> None:
    frames = coil_frames(line)
    store = CoilStore.open(postgres_url.new_database(), line)
    spool = Spool(tmp_path, max_bytes=10 * 2**20)
    for batch in batches_of(frames):
        spool.append(batch)
    postgres_url.stop_postgres()
    try:
        with pytest.raises(StoreUnavailable):
            spool.drain(store)
        assert spool.pending_frames == len(frames)
        spool.append(frames[:2])  # still taking batches while the database is down
    finally:
        postgres_url.start_postgres()
    assert spool.drain(store) == len(frames) + 2 and spool.pending_frames == 0
    assert store.close_coil("C1", None, "end").frames == len(frames)
