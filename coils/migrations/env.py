"""Alembic's environment for the coil database: runs on the connection :mod:`coils.store` hands it.

No ``alembic.ini`` and no URL here: the store builds the Alembic ``Config`` in code and passes its
open connection (inside the store's transaction) as ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("coils.migrations runs only from coils.store (config.attributes['connection'] is not set)")
context.configure(connection=connection, target_metadata=None, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
