"""Alarms in the coil database (table ``alarms``, revision 0003): raised, listed, acknowledged.

Beside :class:`coils.store.CoilStore`, on its engine: replicas sharing one database share their
alarms, and an acknowledgement made on one (console, OPC UA) is seen by all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from coils import schema
from coils.alarms import Alarm
from coils.store import CoilStore


class AlarmStore:
    """The ``alarms`` table; every call is one transaction (StoreUnavailable when the database is down)."""

    def __init__(self, store: CoilStore) -> None:
        self._store = store

    def add(self, alarm: Alarm) -> Alarm:
        """Keeps ``alarm``; returns it with the id the database gave it."""
        return self.add_many([alarm])[0]

    def add_many(self, alarms: Sequence[Alarm]) -> list[Alarm]:
        """Keeps ``alarms`` in one transaction (one commit, one sync: an evaluation may raise dozens, and
        the coil writer waits for the database's write lock meanwhile); returns them with their ids."""
        kept = []
        with self._store.transaction(write=True) as connection:
            for alarm in alarms:
                row = {k: v for k, v in alarm.to_dict().items() if k != "alarm_id"}
                alarm_id = connection.execute(schema.alarms.insert().values(**row)).inserted_primary_key[0]
                kept.append(Alarm(**row, alarm_id=int(alarm_id)))
        return kept

    def acknowledge(self, alarm_id: int, by: str, at_unix_s: float) -> Alarm:
        """Acknowledges an alarm (an acknowledged one keeps its first acknowledgement); KeyError when unknown."""
        a = schema.alarms.c
        with self._store.transaction(write=True) as connection:
            connection.execute(schema.alarms.update().where(a.alarm_id == alarm_id, a.acknowledged_unix_s.is_(None))
                               .values(acknowledged_unix_s=at_unix_s, acknowledged_by=by))
            row = connection.execute(sa.select(schema.alarms).where(a.alarm_id == alarm_id)).first()
        if row is None:
            raise KeyError(f"no alarm {alarm_id}")
        return _alarm(row)

    def recent(self, limit: int) -> list[Alarm]:
        """The latest ``limit`` alarms, newest first."""
        a = schema.alarms.c
        with self._store.transaction(write=False) as connection:
            rows = connection.execute(sa.select(schema.alarms).order_by(a.raised_unix_s.desc(), a.alarm_id.desc())
                                      .limit(limit)).all()
        return [_alarm(row) for row in rows]


    def for_coil(self, coil_id: str) -> list[Alarm]:
        """The alarms raised on one coil, oldest first."""
        a = schema.alarms.c
        with self._store.transaction(write=False) as connection:
            rows = connection.execute(sa.select(schema.alarms).where(a.coil_id == coil_id)
                                      .order_by(a.raised_unix_s, a.alarm_id)).all()
        return [_alarm(row) for row in rows]


def _alarm(row: Any) -> Alarm:
    return Alarm(**{k: getattr(row, k) for k in Alarm.__dataclass_fields__})


__all__ = ["AlarmStore"]
