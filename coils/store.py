"""The coil store: each answered frame's mask components in a database, a coil's records made at close.

``server serve --coil-db URL`` writes every answered frame of a coil here before the frame's
answer goes out (:meth:`CoilStore.write_frames`, one transaction per batch) and closes coils on
``EndCoil`` or a silence (:meth:`CoilStore.close_coil`). SQLite (``sqlite:///coils.db``) for one
server, PostgreSQL (``postgresql://...``) for replicas sharing one database (:mod:`coils.schema`).

Merge at close: the write path stores components, keyed by frame, and nothing else. A coil's
records are made from all its components (whichever replica wrote them) by union-find
(:class:`coils.records.RecordBuilder`) when it closes, and stored then with its summary; an open
coil's records are made the same way on read. So writes need no coordination between replicas,
a resent frame (same coil, camera and frame id) is a primary key already there and changes
nothing, and records never depend on which replica saw which frame or in what order.

A frame for a closed coil is kept apart (``late_frames``; not merged, the records stay final) and
returned to the caller to report. A database that cannot be reached or answers too slowly raises
:class:`StoreUnavailable` within a few seconds (:data:`coils.schema.TIMEOUT_S`); the caller spools
(:mod:`coils.spool`).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from coils import schema
from coils.columns import ComponentColumns, merged_records
from coils.line import Line
from coils.periodic import find_periodic
from coils.records import Component, DefectRecord, FrameKey, default_gap_mm
from coils.summary import CLOSED, OPEN, CoilFacts, CoilSummary, summarise
from coils.verdict import CoilVerdict, Grader, judge

log = logging.getLogger(__name__)

#: Frame ids are uint64 on the wire and BIGINT (signed) in the database: stored modulo 2**64.
_UINT64 = 1 << 64
_INT64_MAX = (1 << 63) - 1


class StoreUnavailable(RuntimeError):
    """The coil database cannot be reached, or did not answer within the store's timeouts."""


@dataclass(frozen=True)
class FrameComponents:
    """One answered frame of a coil: where it lies and its mask components (none for a clean frame)."""

    key: FrameKey
    position_mm: float
    components: tuple[Component, ...]
    received_unix_s: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the spool's entries)."""
        return {"coil_id": self.key.coil_id, "camera_id": self.key.camera_id, "frame_id": self.key.frame_id,
                "position_mm": self.position_mm, "received_unix_s": self.received_unix_s,
                "components": [c.to_dict() for c in self.components]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrameComponents:
        """What :meth:`to_dict` wrote; KeyError naming a missing or unknown key."""
        expected = ("coil_id", "camera_id", "frame_id", "position_mm", "received_unix_s", "components")
        if sorted(data) != sorted(expected):
            raise KeyError(f"frame components: expected keys {list(expected)}, got {sorted(data)}")
        return cls(FrameKey(str(data["coil_id"]), str(data["camera_id"]), int(data["frame_id"])),
                   float(data["position_mm"]), tuple(Component.from_dict(c) for c in data["components"]),
                   float(data["received_unix_s"]))


class _Snapshot(NamedTuple):
    """A coil as read in one transaction: its row, its frame count and the components of its merged frames."""

    row: Any
    frames: int
    components: ComponentColumns


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a coil's tens of thousands of records are made.

    None of them is cyclic, but each allocation burst triggers collections that walk all of them
    again: a third of a 40,000-frame coil's close. Callers on several threads are safe: a caller
    that found the collector on turns it back on when done, so it never stays off.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _db_frame_id(frame_id: int) -> int:
    return frame_id - _UINT64 if frame_id > _INT64_MAX else frame_id


def _wire_frame_id(frame_id: int) -> int:
    return frame_id + _UINT64 if frame_id < 0 else frame_id


class CoilStore:
    """Coils, their frames' components, records and summaries in one database (see the module's doc).

    Thread-safe: every call takes its own connection and transaction. Open with :meth:`open`.
    """

    def __init__(self, engine: Engine, line: Line) -> None:
        self._engine = engine
        self.line = line
        self.url = engine.url.render_as_string(hide_password=True)
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self._insert_new = lambda table: insert(table).on_conflict_do_nothing()
        #: Grades coils at close and on read (``server serve --grading``); None: no grades.
        self.grader: Grader | None = None

    @classmethod
    def open(cls, url: str, line: Line) -> CoilStore:
        """Opens ``url`` (``sqlite:///path``, ``postgresql://...``), creating or upgrading its schema to head.

        Raises:
            ValueError: not a SQLite or PostgreSQL URL.
            StoreUnavailable: the database cannot be reached.
        """
        engine = schema.create_engine(url)
        store = cls(engine, line)
        try:
            with store._unavailable():
                schema.upgrade(engine)
        except BaseException:
            engine.dispose()
            raise
        return store

    def close(self) -> None:
        """Closes the store's connections."""
        self._engine.dispose()

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        try:
            yield
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as exc:
            reason = getattr(exc, "orig", None) or exc
            raise StoreUnavailable(f"coil database {self.url} is unavailable: "
                                   f"{type(reason).__name__}: {str(reason).strip()}") from exc

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Connection]:
        with self._unavailable(), self._engine.connect() as connection:
            if write:
                connection.execution_options(**{schema.WRITE: True})
            with connection.begin():
                yield connection

    def transaction(self, write: bool) -> AbstractContextManager[Connection]:
        """A connection in one transaction, its failures raised as StoreUnavailable (for coils.alarm_store)."""
        return self._transaction(write)

    # ------------------------------------------------------------------ writes
    def write_frames(self, frames: Sequence[FrameComponents]) -> list[FrameKey]:
        """Stores a batch of answered frames in one transaction; returns the keys of those that came late.

        Idempotent: a frame whose key is stored already changes nothing. A frame of a closed coil is
        kept as a late frame (not merged into the coil's final records) and its key returned, for
        the caller to report. A coil's row is created with its first frame.

        Raises:
            KeyError: a frame's camera is not on the line.
            StoreUnavailable: the database is down or too slow; nothing of the batch was stored.
        """
        by_coil: dict[str, list[FrameComponents]] = defaultdict(list)
        for frame in frames:
            self.line.camera(frame.key.camera_id)
            by_coil[frame.key.coil_id].append(frame)
        if not by_coil:
            return []
        late: list[FrameKey] = []
        with self._transaction(write=True) as connection:
            merged: list[FrameComponents] = []
            for coil_id in sorted(by_coil):  # one lock order for every writer: no deadlocks between replicas
                batch = by_coil[coil_id]
                if self._touch_coil(connection, coil_id, batch):
                    merged += batch
                else:
                    late += self._write_late(connection, coil_id, batch)
            self._write_merged(connection, merged)
        return late

    def _touch_coil(self, connection: Connection, coil_id: str, batch: list[FrameComponents]) -> bool:
        """Creates the coil's row or widens its first/latest frame times and furthest end; False when it is closed.

        The UPDATE takes the coil's row lock until the batch commits, so a close running beside it
        either waits for the batch (and merges it) or went first (and the batch is late).
        """
        received = [f.received_unix_s for f in batch]
        far_end = max(f.position_mm + self.line.camera(f.key.camera_id).frame_length_mm for f in batch)
        connection.execute(self._insert_new(schema.coils).values(
            coil_id=coil_id, state=OPEN, opened_unix_s=min(received), last_frame_unix_s=max(received),
            far_end_mm=far_end, close_reason=""))
        c = schema.coils.c
        done = connection.execute(
            schema.coils.update().where(c.coil_id == coil_id, c.state == OPEN).values(
                opened_unix_s=sa.case((c.opened_unix_s > min(received), min(received)), else_=c.opened_unix_s),
                last_frame_unix_s=sa.case((c.last_frame_unix_s < max(received), max(received)),
                                          else_=c.last_frame_unix_s),
                far_end_mm=sa.case((c.far_end_mm < far_end, far_end), else_=c.far_end_mm)))
        return done.rowcount == 1

    def _write_merged(self, connection: Connection, batch: list[FrameComponents]) -> None:
        if not batch:
            return
        _insert_many(connection, schema.frames, [_frame_row(f) for f in batch])
        rows = [_component_row(f.key, n, c, late=False) for f in batch for n, c in enumerate(f.components)]
        if rows:
            _insert_many(connection, schema.components, rows)

    def _write_late(self, connection: Connection, coil_id: str, batch: list[FrameComponents]) -> list[FrameKey]:
        """Keeps the frames of closed ``coil_id`` that were not merged before it closed; returns their keys."""
        f = schema.frames.c
        wanted = [(b.key.camera_id, _db_frame_id(b.key.frame_id)) for b in batch]
        stored = {(camera, _wire_frame_id(frame)) for camera, frame in connection.execute(
            sa.select(f.camera_id, f.frame_id).where(f.coil_id == coil_id,
                                                     sa.tuple_(f.camera_id, f.frame_id).in_(wanted)))}
        late = [b for b in batch if (b.key.camera_id, b.key.frame_id) not in stored]
        if late:
            _insert_many(connection, schema.late_frames, [_frame_row(b) for b in late])
            rows = [_component_row(b.key, n, c, late=True) for b in late for n, c in enumerate(b.components)]
            if rows:
                _insert_many(connection, schema.components, rows)
            log.info("coil %s is closed: %d frame(s) kept as late, not merged (first: camera %s frame %d)",
                     coil_id, len(late), late[0].key.camera_id, late[0].key.frame_id)
        return [b.key for b in late]

    # ------------------------------------------------------------------ close
    def close_coil(self, coil_id: str, length_mm: float | None, reason: str) -> CoilSummary:
        """Closes a coil: makes its final records from every stored component and stores them with its summary.

        Idempotent: a closed coil's stored summary is returned as it is (a second replica closing the
        same coil at the same time gets the first one's). The records are made outside the write
        transaction, and made again under the coil's row lock only if frames arrived meanwhile.

        Args:
            length_mm: the coil's length from ``EndCoil``; None: the furthest along end of any frame.
            reason: ``"end"`` or ``"silence"``.

        Raises:
            KeyError: no frame of this coil was ever stored.
            StoreUnavailable: the database is down or too slow; the coil stays open.
        """
        if reason not in ("end", "silence"):
            raise ValueError(f"close reason must be 'end' or 'silence', got {reason!r}")
        with collector_paused():
            return self._close(coil_id, length_mm, reason)

    def _close(self, coil_id: str, length_mm: float | None, reason: str) -> CoilSummary:
        with self._transaction(write=False) as connection:
            if self._coil_row(connection, coil_id).state == CLOSED:
                return self._summary(connection, coil_id)[0]
            snapshot = self._snapshot(connection, coil_id)
        built = self._records(snapshot)
        periodic = find_periodic(self.line, built)  # outside the write transaction: it can take a while
        with self._transaction(write=True) as connection:
            c = schema.coils.c
            closed = connection.execute(schema.coils.update().where(c.coil_id == coil_id, c.state == OPEN).values(
                state=CLOSED, closed_unix_s=time.time(), close_reason=reason, end_length_mm=length_mm))
            if closed.rowcount == 1:
                if self._frame_count(connection, coil_id) != snapshot.frames:
                    snapshot = self._snapshot(connection, coil_id)  # under the row lock: nothing else arrives
                    built = self._records(snapshot)
                    periodic = find_periodic(self.line, built)
                summary = self._facts_summary(connection, coil_id, built)
                self._write_records(connection, coil_id, built)
                verdict = judge(self.line, summary, built, self.grader, periodic=periodic)
                connection.execute(schema.coils.update().where(c.coil_id == coil_id).values(
                    summary=json.dumps(summary.to_dict()), **verdict.columns()))
                log.info("coil %s closed (%s): %d frames, %d records", coil_id, reason, summary.frames, len(built))
                return summary
        return self.get_coil(coil_id)[0]  # another replica closed it first

    def _write_records(self, connection: Connection, coil_id: str, built: list[DefectRecord]) -> None:
        """Inserts the coil's records (a coil may have tens of thousands)."""
        if not built:
            return
        quoted: dict[str, str] = {}  # camera id -> its JSON string

        def camera(camera_id: str) -> str:
            if camera_id not in quoted:
                quoted[camera_id] = json.dumps(camera_id)
            return quoted[camera_id]

        def frames(record: DefectRecord) -> str:
            if len(record.frames) == 1:  # most records
                return f"[[{camera(record.frames[0][0])},{record.frames[0][1]}]]"
            return "[" + ",".join(f"[{camera(c)},{f}]" for c, f in record.frames) + "]"

        rows = [(coil_id, n, r.class_id, r.along_start_mm, r.along_end_mm, r.across_start_mm, r.across_end_mm,
                 r.area_mm2, r.max_probability, frames(r), "[" + ",".join(camera(c) for c in r.cameras) + "]")
                for n, r in enumerate(built)]
        _insert_many(connection, schema.records, rows)

    # ------------------------------------------------------------------ reads
    def silent_coils(self, silence_s: float, now_unix_s: float) -> list[str]:
        """Open coils whose latest frame was received more than ``silence_s`` before ``now_unix_s``, sorted."""
        c = schema.coils.c
        with self._transaction(write=False) as connection:
            found = connection.execute(sa.select(c.coil_id).where(
                c.state == OPEN, c.last_frame_unix_s < now_unix_s - silence_s).order_by(c.coil_id))
            return [row.coil_id for row in found]

    def list_coils(self, limit: int, before_unix_s: float | None = None,
                   after_coil_id: str | None = None) -> list[CoilSummary]:
        """Up to ``limit`` coils, newest (by opening) first, then by coil id.

        ``before_unix_s`` (with ``after_coil_id``: the last coil of the previous page) continues a
        listing after that coil: coils opened at the same instant are neither skipped nor repeated.
        An open coil's summary is made from its records as they stand (merged on read).
        """
        c = schema.coils.c
        query = sa.select(c.coil_id).order_by(c.opened_unix_s.desc(), c.coil_id).limit(max(0, int(limit)))
        if before_unix_s is not None and after_coil_id is not None:
            query = query.where(sa.or_(c.opened_unix_s < before_unix_s,
                                       sa.and_(c.opened_unix_s == before_unix_s, c.coil_id > after_coil_id)))
        elif before_unix_s is not None:
            query = query.where(c.opened_unix_s < before_unix_s)
        with self._transaction(write=False) as connection:
            coil_ids = list(connection.execute(query).scalars())
            return [self._summary(connection, coil_id)[0] for coil_id in coil_ids]

    def get_coil(self, coil_id: str) -> tuple[CoilSummary, list[DefectRecord]]:
        """A coil's summary and records (final for a closed coil, as they stand for an open one).

        Raises:
            KeyError: no such coil.
        """
        with collector_paused(), self._transaction(write=False) as connection:
            summary, built = self._summary(connection, coil_id)
            return summary, built if built is not None else self._stored_records(connection, coil_id)

    def verdict(self, summary: CoilSummary, records: Sequence[DefectRecord]) -> CoilVerdict:
        """The coil's periodic defects and grade: as stored at close, else (open) judged from ``records``.

        ``summary`` and ``records`` are what :meth:`get_coil` gave for the coil.
        """
        with self._transaction(write=False) as connection:
            stored = CoilVerdict.from_row(self._coil_row(connection, summary.coil_id))
        return stored if stored is not None else judge(self.line, summary, records, self.grader)

    def _summary(self, connection: Connection, coil_id: str) -> tuple[CoilSummary, list[DefectRecord] | None]:
        """The coil's summary, and its records when they had to be made (an open coil)."""
        row = self._coil_row(connection, coil_id)
        if row.state == CLOSED and row.summary is not None:
            stored = CoilSummary.from_dict(json.loads(row.summary))
            return dataclasses.replace(stored, late_frames=self._late_count(connection, coil_id)), None
        built = self._records(self._snapshot(connection, coil_id))
        return self._facts_summary(connection, coil_id, built), built

    def _facts_summary(self, connection: Connection, coil_id: str, built: list[DefectRecord]) -> CoilSummary:
        row = self._coil_row(connection, coil_id)
        length = row.end_length_mm if row.end_length_mm is not None else row.far_end_mm
        facts = CoilFacts(coil_id, row.state, row.opened_unix_s, row.last_frame_unix_s, row.closed_unix_s,
                          row.close_reason, float(length), self._frame_count(connection, coil_id),
                          self._late_count(connection, coil_id))
        return summarise(facts, built)

    @staticmethod
    def _coil_row(connection: Connection, coil_id: str) -> Any:
        row = connection.execute(sa.select(schema.coils).where(schema.coils.c.coil_id == coil_id)).first()
        if row is None:
            raise KeyError(f"no coil {coil_id!r} in the coil database")
        return row

    @staticmethod
    def _frame_count(connection: Connection, coil_id: str) -> int:
        f = schema.frames.c
        return int(connection.execute(sa.select(sa.func.count()).where(f.coil_id == coil_id)).scalar_one())

    @staticmethod
    def _late_count(connection: Connection, coil_id: str) -> int:
        f = schema.late_frames.c
        return int(connection.execute(sa.select(sa.func.count()).where(f.coil_id == coil_id)).scalar_one())

    def _snapshot(self, connection: Connection, coil_id: str) -> _Snapshot:
        row = self._coil_row(connection, coil_id)
        count = self._frame_count(connection, coil_id)
        t = schema.components.c
        found = connection.execute(
            sa.select(t.camera_id, t.frame_id, t.class_id, t.along_start_mm, t.across_start_mm, t.mm_per_px_along,
                      t.mm_per_px_across, t.pixel_count, t.area_mm2, t.max_probability, t.mask_rows, t.mask_cols,
                      t.mask).where(t.coil_id == coil_id, sa.not_(t.late))
            .order_by(t.camera_id, t.frame_id, t.component_no)).all()
        if any(r[1] < 0 for r in found):  # frame ids past 2**63 on the wire
            found = [(r[0], _wire_frame_id(r[1]), *r[2:]) for r in found]
        return _Snapshot(row, count, ComponentColumns.from_rows(coil_id, found))

    def _records(self, snapshot: _Snapshot) -> list[DefectRecord]:
        return merged_records(snapshot.components, default_gap_mm(self.line))

    @staticmethod
    def _stored_records(connection: Connection, coil_id: str) -> list[DefectRecord]:
        r = schema.records.c
        found = connection.execute(sa.select(schema.records).where(r.coil_id == coil_id).order_by(r.record_no))
        return [DefectRecord(coil_id, row.class_id, row.along_start_mm, row.along_end_mm, row.across_start_mm,
                             row.across_end_mm, row.area_mm2, row.max_probability,
                             tuple((camera, frame) for camera, frame in json.loads(row.frames)),
                             tuple(json.loads(row.cameras))) for row in found]


def _insert_many(connection: Connection, table: sa.Table, rows: list[tuple[Any, ...]]) -> None:
    """``INSERT ... ON CONFLICT DO NOTHING`` of ``rows`` (plain tuples in ``table``'s column order).

    Through the driver's own executemany: SQLAlchemy's per-row parameter processing cost more than
    the insert itself on the write path (every answered frame's components, before its answer).
    """
    connection.exec_driver_sql(_insert_sql(table, connection.dialect.paramstyle), rows)


@functools.cache
def _insert_sql(table: sa.Table, paramstyle: str) -> str:
    names = [c.name for c in table.columns]
    mark = "?" if paramstyle == "qmark" else "%s"
    return (f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join([mark] * len(names))}) "
            f"ON CONFLICT DO NOTHING")


def _frame_row(frame: FrameComponents) -> tuple[Any, ...]:
    """A row of ``frames`` or ``late_frames``, in the table's column order."""
    key = frame.key
    return key.coil_id, key.camera_id, _db_frame_id(key.frame_id), frame.position_mm, frame.received_unix_s


def _component_row(key: FrameKey, number: int, component: Component, late: bool) -> tuple[Any, ...]:
    """A row of ``components``, in the table's column order."""
    rows, cols = component.mask.shape
    return (key.coil_id, key.camera_id, _db_frame_id(key.frame_id), number, component.class_id,
            component.along_start_mm, component.across_start_mm, component.mm_per_px_along,
            component.mm_per_px_across, component.pixel_count, component.area_mm2, component.max_probability, rows,
            cols, component.packed_mask(), late)


__all__ = ["CoilStore", "FrameComponents", "StoreUnavailable"]
