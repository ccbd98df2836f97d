"""The coil database: its tables as SQLAlchemy Core sees them, its engines, and its upgrade to head.

The tables here are the schema at :data:`coils.migrations.HEAD`; the revisions in
``coils/migrations/versions`` create it (a test compares the two). :func:`create_engine` maps a
``--coil-db`` URL to the engine the store needs:

* ``sqlite:///path``: WAL journal (readers never wait for the writer), ``synchronous=FULL`` (a
  committed batch survives a power cut, not only a killed process), and write transactions that
  begin ``IMMEDIATE`` so two writers queue for the lock instead of failing on an upgrade;
* ``postgresql://`` (or ``postgres://``): the psycopg 3 driver, short connect, statement and lock
  timeouts, and a pre-ping so that a server restarted since the last call costs no error.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url

from coils.migrations import HEAD

#: Seconds a call may wait for a connection, a lock or a statement before the store is unavailable.
TIMEOUT_S = 5
#: Seconds to open a PostgreSQL connection (libpq's minimum is 2).
CONNECT_TIMEOUT_S = 3
#: Execution option that makes a SQLite transaction begin IMMEDIATE (take the write lock at once).
WRITE = "coils_write"
#: Key of the advisory lock that serialises schema upgrades of replicas starting together (PostgreSQL).
UPGRADE_LOCK = 0x636F696C  # "coil"

metadata = sa.MetaData()
ID = sa.String(256)


def _frame_key() -> list[sa.Column]:
    return [sa.Column("coil_id", ID, primary_key=True), sa.Column("camera_id", ID, primary_key=True),
            sa.Column("frame_id", sa.BigInteger, primary_key=True)]


coils = sa.Table(
    "coils", metadata,
    sa.Column("coil_id", ID, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("opened_unix_s", sa.Double, nullable=False),
    sa.Column("last_frame_unix_s", sa.Double, nullable=False),
    sa.Column("far_end_mm", sa.Double, nullable=False),
    sa.Column("closed_unix_s", sa.Double),
    sa.Column("close_reason", sa.String(16), nullable=False),
    sa.Column("end_length_mm", sa.Double),
    sa.Column("summary", sa.Text),
    sa.Column("periodic", sa.Text),  # JSON list of coils.periodic.PeriodicDefect, set at close (0003)
    sa.Column("grade", sa.String(64)),
    sa.Column("grade_rule", sa.Text),
)
frames = sa.Table(
    "frames", metadata, *_frame_key(),
    sa.Column("position_mm", sa.Double, nullable=False),
    sa.Column("received_unix_s", sa.Double, nullable=False),
)
late_frames = sa.Table(
    "late_frames", metadata, *_frame_key(),
    sa.Column("position_mm", sa.Double, nullable=False),
    sa.Column("received_unix_s", sa.Double, nullable=False),
)
components = sa.Table(
    "components", metadata, *_frame_key(),
    sa.Column("component_no", sa.Integer, primary_key=True),
    sa.Column("class_id", sa.Integer, nullable=False),
    sa.Column("along_start_mm", sa.Double, nullable=False),
    sa.Column("across_start_mm", sa.Double, nullable=False),
    sa.Column("mm_per_px_along", sa.Double, nullable=False),
    sa.Column("mm_per_px_across", sa.Double, nullable=False),
    sa.Column("pixel_count", sa.Integer, nullable=False),
    sa.Column("area_mm2", sa.Double, nullable=False),
    sa.Column("max_probability", sa.Double),
    sa.Column("mask_rows", sa.Integer, nullable=False),
    sa.Column("mask_cols", sa.Integer, nullable=False),
    sa.Column("mask", sa.LargeBinary, nullable=False),
    sa.Column("late", sa.Boolean, nullable=False),
)
records = sa.Table(
    "records", metadata,
    sa.Column("coil_id", ID, primary_key=True),
    sa.Column("record_no", sa.Integer, primary_key=True),
    sa.Column("class_id", sa.Integer, nullable=False),
    sa.Column("along_start_mm", sa.Double, nullable=False),
    sa.Column("along_end_mm", sa.Double, nullable=False),
    sa.Column("across_start_mm", sa.Double, nullable=False),
    sa.Column("across_end_mm", sa.Double, nullable=False),
    sa.Column("area_mm2", sa.Double, nullable=False),
    sa.Column("max_probability", sa.Double),
    sa.Column("frames", sa.Text, nullable=False),
    sa.Column("cameras", sa.Text, nullable=False),
)

alarms = sa.Table(
    "alarms", metadata,
    sa.Column("alarm_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rule", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("severity", sa.Integer, nullable=False),
    sa.Column("coil_id", ID, nullable=False),
    sa.Column("camera_id", ID, nullable=False),
    sa.Column("position_mm", sa.Double),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("raised_unix_s", sa.Double, nullable=False),
    sa.Column("acknowledged_unix_s", sa.Double),
    sa.Column("acknowledged_by", ID, nullable=False),
)


def database_url(url: str) -> URL:
    """``url`` as SQLAlchemy opens it: ``postgresql://`` and ``postgres://`` get the psycopg 3 driver.

    Raises:
        ValueError: neither SQLite nor PostgreSQL, or not a URL.
    """
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ValueError(f"coil database {url!r} is not a URL (sqlite:///path or postgresql://...)") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend == "postgresql" and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError(f"coil database {url!r}: a SQLite store needs a file (sqlite:///path/coils.db)")
        return parsed.set(drivername="sqlite")
    raise ValueError(f"coil database {parsed.render_as_string(hide_password=True)!r}: expected sqlite:///path "
                     f"or postgresql://user@host/db")


def create_engine(url: str) -> Engine:
    """An engine for ``url`` (:func:`database_url`) with the timeouts and SQLite settings above."""
    parsed = database_url(url)
    if parsed.get_backend_name() == "sqlite":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": TIMEOUT_S}, pool_timeout=TIMEOUT_S)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    options = f"-c statement_timeout={TIMEOUT_S * 1000} -c lock_timeout={TIMEOUT_S * 1000}"
    return sa.create_engine(parsed, pool_pre_ping=True, pool_timeout=TIMEOUT_S, connect_args={
        "connect_timeout": CONNECT_TIMEOUT_S, "options": options,
        "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2,
        "tcp_user_timeout": TIMEOUT_S * 1000})


def _sqlite_connect(dbapi_connection, _record) -> None:
    # The driver's own BEGIN handling is off: _sqlite_begin says how each transaction starts.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    write = connection.get_execution_options().get(WRITE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration in code (no ``alembic.ini``), running on ``connection``."""
    config = Config()
    config.set_main_option("script_location", "coils:migrations")
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = HEAD) -> None:
    """Creates or upgrades the schema to ``revision`` in one transaction (replicas starting together wait)."""
    with engine.connect() as connection:
        connection.execution_options(**{WRITE: True})
        with connection.begin():
            if engine.dialect.name == "postgresql":
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK})
            command.upgrade(alembic_config(connection), revision)


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision; None for an empty database."""
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


__all__ = ["CONNECT_TIMEOUT_S", "TIMEOUT_S", "alarms", "alembic_config", "coils", "components", "create_engine",
           "current_revision", "database_url", "frames", "late_frames", "metadata", "records", "upgrade"]
