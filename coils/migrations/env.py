"""Alembic's environment for the coil database: runs on the connection :mod:`coils.schema` hands it.

No ``alembic.ini`` and no URL here: the store builds the Alembic ``Config`` in code and passes its
open connection (inside the store's transaction) as ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context


def run_migrations() -> None:
    """Runs the pending revisions on the store's connection, in its transaction."""
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("coils.migrations runs from coils.schema.upgrade only (no connection was given)")
    context.configure(connection=connection, target_metadata=None,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


# Alembic installs context.config while it runs this file; a plain import (the package's import checks) runs nothing.
if hasattr(context, "config"):
    run_migrations()
