"""The coil database's schema, versioned with Alembic: ``env.py`` and ``versions/`` (one file per revision).

:meth:`coils.store.CoilStore.open` upgrades a database to :data:`HEAD` (creating it when empty), so
a newer server opens an older database. A new revision is a new file in ``versions/`` whose
``down_revision`` is the current head; set :data:`HEAD` to it.
"""

from __future__ import annotations

#: The newest revision: what this code reads and writes.
HEAD = "0003"
