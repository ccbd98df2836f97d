"""The coil store on real SQLite files and a real PostgreSQL server: records merged at close equal the
record builder's, writes are idempotent, late frames are kept, closes race safely, an older schema is
upgraded with its data, and a database that is down raises StoreUnavailable quickly."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import sqlalchemy as sa

from coils import schema
from coils.migrations import HEAD
from coils.records import Component, DefectRecord, FrameKey, masks_components
from coils.store import CoilStore, FrameComponents, StoreUnavailable
from coils.summary import LARGEST, CoilSummary
from tests.coils.test_records import as_truth, built, frames_of, planted, two_cameras


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'coils.db'}"
    return request.getfixturevalue("postgres_url").new_database()


@pytest.fixture
def line():
    return two_cameras()


def coil_frames(line, coil_id: str = "C1", canvas: np.ndarray | None = None) -> list[FrameComponents]:
    """The planted canvas's frames as the server writes them: components per frame, clean frames too."""
    found = []
    for camera, frame_id, position, masks in frames_of(planted() if canvas is None else canvas, line):
        key = FrameKey(coil_id, camera, frame_id)
        found.append(FrameComponents(key, position, tuple(masks_components(line, key, position, masks)),
                                     1000.0 + frame_id))
    return found


def truth(line, coil_id: str = "C1"):
    return built(line, frames_of(planted(), line), coil=coil_id)


def table_count(store: CoilStore, table: sa.Table, **where) -> int:
    with store._engine.connect() as connection:
        query = sa.select(sa.func.count()).select_from(table)
        for column, value in where.items():
            query = query.where(table.c[column] == value)
        return int(connection.execute(query).scalar_one())


def test_records_at_close_are_the_builders_whichever_replica_wrote_which_frame(store_url, line) -> None:
    frames = coil_frames(line)
    first, second = CoilStore.open(store_url, line), CoilStore.open(store_url, line)
    assert first.write_frames(frames[1::2]) == [] and second.write_frames(frames[0::2]) == []
    summary, records = second.get_coil("C1")  # open: merged on read
    assert summary.state == "open" and as_truth(records) == as_truth(truth(line))
    closed = first.close_coil("C1", None, "end")
    stored_summary, stored = second.get_coil("C1")
    assert stored == records == truth(line) and stored_summary == closed
    assert closed.state == "closed" and closed.close_reason == "end" and closed.closed_unix_s is not None
    assert closed.frames == len(frames) and closed.late_frames == 0
    assert closed.length_mm == 240.0  # the furthest frame end: 12 frames of 20 mm
    assert closed.defects_per_class == {1: 8, 2: 1} and closed.per_100m == {1: 8 / 0.0024, 2: 1 / 0.0024}
    assert closed.opened_unix_s == 1000.0 and closed.last_frame_unix_s == 1011.0
    areas = [r.area_mm2 for r in closed.largest]
    assert len(closed.largest) == min(LARGEST, len(records)) and areas == sorted(areas, reverse=True)
    assert areas[0] == max(r.area_mm2 for r in records)
    assert table_count(first, schema.records, coil_id="C1") == len(records)
    first.close(), second.close()


def test_resent_frames_change_nothing(store_url, line) -> None:
    frames = coil_frames(line)
    store = CoilStore.open(store_url, line)
    store.write_frames(frames[:10])
    components = table_count(store, schema.components)
    assert store.write_frames(frames[:10]) == [] and table_count(store, schema.components) == components
    store.write_frames(frames[5:])  # overlapping the first batch
    assert table_count(store, schema.frames) == len(frames)
    assert table_count(store, schema.components) == sum(len(f.components) for f in frames)
    summary = store.close_coil("C1", 250.0, "end")
    assert summary.frames == len(frames) and summary.length_mm == 250.0
    assert store.get_coil("C1")[1] == truth(line)


def test_frames_for_a_closed_coil_are_kept_late_and_returned(store_url, line) -> None:
    frames = coil_frames(line)
    store = CoilStore.open(store_url, line)
    store.write_frames(frames)
    closed = store.close_coil("C1", None, "silence")
    late_frame = dataclasses.replace(frames[3], key=FrameKey("C1", "cam0", 99))
    other_coil = dataclasses.replace(frames[3], key=FrameKey("C2", "cam0", 3))
    assert store.write_frames([frames[3], late_frame, other_coil]) == [late_frame.key]  # a resend is not late
    assert store.write_frames([late_frame]) == [late_frame.key]  # still late, still stored once
    summary, records = store.get_coil("C1")
    assert records == truth(line) and summary.late_frames == 1 and summary.frames == closed.frames
    assert table_count(store, schema.late_frames) == 1
    assert table_count(store, schema.components, late=True) == len(late_frame.components) > 0
    assert store.close_coil("C1", None, "end") == summary  # closing again: the stored summary
    assert store.get_coil("C2")[0].state == "open"


def test_two_replicas_closing_at_once_store_one_result(store_url, line) -> None:
    store = CoilStore.open(store_url, line)
    store.write_frames(coil_frames(line))
    replicas = [CoilStore.open(store_url, line) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        summaries = list(pool.map(lambda s: s.close_coil("C1", None, "end"), replicas))
    assert summaries[0] == summaries[1] == summaries[2]
    assert table_count(store, schema.records) == len(truth(line)) and store.get_coil("C1")[1] == truth(line)


def test_frames_written_while_the_coil_closes_are_merged_or_late(store_url, line) -> None:
    frames = coil_frames(line)
    store, writer = CoilStore.open(store_url, line), CoilStore.open(store_url, line)
    store.write_frames(frames[:4])
    late: list[FrameKey] = []
    started = threading.Event()

    def write() -> None:
        for i in range(4, len(frames), 2):
            late.extend(writer.write_frames(frames[i:i + 2]))
            started.set()

    thread = threading.Thread(target=write)
    thread.start()
    started.wait(10)
    summary = store.close_coil("C1", None, "end")
    thread.join()
    merged = [(f.key.camera_id, f.key.frame_id, f.position_mm) for f in frames if f.key not in late]
    expected = built(line, [m for m in frames_of(planted(), line) if m[:3] in merged])
    assert store.get_coil("C1")[1] == expected
    assert summary.frames == len(merged) and store.get_coil("C1")[0].late_frames == len(late)


def test_silent_and_listed_coils(store_url, line) -> None:
    store = CoilStore.open(store_url, line)
    for n, coil_id in enumerate(["A", "B", "C"]):
        frame = coil_frames(line, coil_id)[0]
        store.write_frames([dataclasses.replace(frame, received_unix_s=100.0 * (n + 1))])
    assert store.silent_coils(150.0, now_unix_s=400.0) == ["A", "B"]
    store.close_coil("A", None, "silence")
    assert store.silent_coils(150.0, now_unix_s=400.0) == ["B"]
    assert [s.coil_id for s in store.list_coils(10)] == ["C", "B", "A"]
    assert [s.coil_id for s in store.list_coils(2)] == ["C", "B"]
    assert [s.coil_id for s in store.list_coils(2, before_unix_s=200.0)] == ["A"]
    assert [s.coil_id for s in store.list_coils(2, before_unix_s=200.0, after_coil_id="B")] == ["A"]
    assert [s.state for s in store.list_coils(10)] == ["open", "open", "closed"]
    for coil_id in ["F", "D", "E"]:  # opened at one instant: a page boundary between them skips none
        store.write_frames([dataclasses.replace(coil_frames(line, coil_id)[0], received_unix_s=500.0)])
    first = store.list_coils(2)
    assert [s.coil_id for s in first] == ["D", "E"]
    assert [s.coil_id for s in store.list_coils(2, 500.0, after_coil_id=first[-1].coil_id)] == ["F", "C"]
    with pytest.raises(KeyError, match="no coil 'Z'"):
        store.get_coil("Z")
    with pytest.raises(KeyError, match="no coil 'Z'"):
        store.close_coil("Z", None, "end")


def test_a_newer_store_opens_an_older_database_with_its_data(store_url, line) -> None:
    engine = schema.create_engine(store_url)
    schema.upgrade(engine, "0001")
    assert schema.current_revision(engine) == "0001"
    frames = coil_frames(line)
    with engine.begin() as connection:  # what the revision-0001 server wrote: no late column, no late table
        connection.execute(sa.text("INSERT INTO coils (coil_id, state, opened_unix_s, last_frame_unix_s, "
                                   "far_end_mm, close_reason) VALUES ('C1', 'open', 1000, 1011, 240, '')"))
        connection.execute(sa.text("INSERT INTO frames VALUES (:coil_id, :camera_id, :frame_id, :position_mm, "
                                   ":received_unix_s)"), [frame_row(f) for f in frames])
        rows = [component_row(f.key, n, c) for f in frames for n, c in enumerate(f.components)]
        columns = ", ".join(rows[0])
        connection.execute(sa.text(f"INSERT INTO components ({columns}) VALUES ({', '.join(':' + k for k in rows[0])})"),
                           rows)
    engine.dispose()
    store = CoilStore.open(store_url, line)
    assert schema.current_revision(store._engine) == HEAD != "0001"
    assert store.get_coil("C1")[1] == truth(line)
    late = dataclasses.replace(frames[0], key=FrameKey("C1", "cam0", 50))
    assert store.close_coil("C1", None, "end").frames == len(frames)
    assert store.write_frames([late]) == [late.key] and store.get_coil("C1")[1] == truth(line)


def frame_row(frame: FrameComponents) -> dict:
    return {"coil_id": frame.key.coil_id, "camera_id": frame.key.camera_id, "frame_id": frame.key.frame_id,
            "position_mm": frame.position_mm, "received_unix_s": frame.received_unix_s}


def component_row(key: FrameKey, number: int, component: Component) -> dict:
    from coils.records import pack_mask

    return {"coil_id": key.coil_id, "camera_id": key.camera_id, "frame_id": key.frame_id, "component_no": number,
            "class_id": component.class_id, "along_start_mm": component.along_start_mm,
            "across_start_mm": component.across_start_mm, "mm_per_px_along": component.mm_per_px_along,
            "mm_per_px_across": component.mm_per_px_across, "pixel_count": component.pixel_count,
            "area_mm2": component.area_mm2, "max_probability": component.max_probability,
            "mask_rows": component.mask.shape[0], "mask_cols": component.mask.shape[1],
            "mask": pack_mask(component.mask)}


def test_the_migrations_make_the_schema_the_store_uses(store_url) -> None:
    engine = schema.create_engine(store_url)
    schema.upgrade(engine)
    inspector = sa.inspect(engine)
    for table in schema.metadata.sorted_tables:
        columns = {c["name"]: c["nullable"] for c in inspector.get_columns(table.name)}
        assert columns == {c.name: c.nullable for c in table.columns}, table.name
        assert inspector.get_pk_constraint(table.name)["constrained_columns"] == [c.name for c in
                                                                                  table.primary_key.columns]
    schema.upgrade(engine)  # at head already: nothing to do
    engine.dispose()


def test_frame_ids_of_the_whole_uint64_range_round_trip(store_url, line) -> None:
    store = CoilStore.open(store_url, line)
    frame = coil_frames(line)[2]
    big = dataclasses.replace(frame, key=FrameKey("C1", "cam0", 2**64 - 1),
                              components=tuple(dataclasses.replace(c, key=FrameKey("C1", "cam0", 2**64 - 1))
                                               for c in frame.components))
    store.write_frames([big])
    (record,) = [r for r in store.get_coil("C1")[1] if r.class_id == 1]
    assert record.frames == (("cam0", 2**64 - 1),)


def test_a_database_that_is_down_raises_store_unavailable_quickly(postgres_url, line) -> None:
    url = postgres_url.new_database()
    store = CoilStore.open(url, line)
    frames = coil_frames(line)
    store.write_frames(frames[:4])
    postgres_url.stop_postgres()
    try:
        for call in (lambda: store.write_frames(frames[4:]), lambda: store.close_coil("C1", None, "end"),
                     lambda: store.list_coils(5)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=f"coil database postgresql\\+psycopg://postgres@127.0.0.1:"
                                                       f"{postgres_url.server.port}/test_\\d+ is unavailable"):
                call()
            assert time.monotonic() - started < schema.TIMEOUT_S + 2
    finally:
        postgres_url.start_postgres()
    assert store.write_frames(frames[4:]) == []  # the pool reconnects: no stale connection error
    assert store.close_coil("C1", None, "end").frames == len(frames)


def test_store_unavailable_names_the_url_without_its_password(line) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StoreUnavailable) as caught:
        CoilStore.open(f"postgresql://inspector:s3cret@127.0.0.1:{port}/coils", line)
    assert f"inspector:***@127.0.0.1:{port}/coils" in str(caught.value) and "s3cret" not in str(caught.value)
    with pytest.raises(ValueError, match="expected sqlite:///path or postgresql://"):
        CoilStore.open("mysql://x@localhost/coils", line)


def test_summaries_records_components_and_frames_round_trip_as_json(line) -> None:
    import json

    frames = coil_frames(line)
    frame = next(f for f in frames if f.components)
    back = FrameComponents.from_dict(json.loads(json.dumps(frame.to_dict())))
    assert (back.key, back.position_mm, back.received_unix_s) == (frame.key, frame.position_mm, frame.received_unix_s)
    assert [plain(c) for c in back.components] == [plain(c) for c in frame.components]
    record = truth(line)[0]
    assert DefectRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    summary = CoilSummary("C1", "closed", 1.0, 2.0, 3.0, "end", 240.0, 24, 1, {1: 2}, {1: 833.3}, (record,))
    assert CoilSummary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary
    with pytest.raises(KeyError, match=r"unknown keys \['colour'\]"):
        DefectRecord.from_dict({**record.to_dict(), "colour": "red"})
    with pytest.raises(KeyError, match=r"missing keys \['largest'\]"):
        CoilSummary.from_dict({k: v for k, v in summary.to_dict().items() if k != "largest"})


def plain(component: Component) -> tuple:
    """``component``'s fields, its mask as nested lists (numpy arrays compare elementwise)."""
    return (*(getattr(component, f.name) for f in dataclasses.fields(component) if f.name != "mask"),
            component.mask.dtype, component.mask.tolist())


def test_component_masks_pack_to_bits_and_back(line) -> None:
    from coils.records import pack_mask, unpack_mask

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 5), (8, 8), (17, 9)]:
        mask = rng.random(shape) > 0.5
        packed = pack_mask(mask)
        assert len(packed) == (mask.size + 7) // 8 and np.array_equal(unpack_mask(packed, shape), mask)
    with pytest.raises(ValueError, match="a packed 3x5 mask has 2 bytes, got 3"):
        unpack_mask(b"abc", (3, 5))
