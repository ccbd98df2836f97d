"""Coils, not frames: the line's geometry (:mod:`coils.line`), a line folder's frame index
(:mod:`coils.line_folder`), defect records in coil coordinates (:mod:`coils.records`), and their
storage: the coil store (:mod:`coils.store`, schema in :mod:`coils.schema` and ``coils/migrations``),
its disk spool (:mod:`coils.spool`) and the coil summary (:mod:`coils.summary`).

The words are CONVENTIONS.md's: a **coil** is one strip (``coil_id``); positions are millimetres
**along** it from the coil's head and **across** it from the operator-side edge; a camera covers a
**lane**; a **defect record** is one physical defect merged from every frame and lane it touches.

This package imports ``engine`` only (numpy, OpenCV and PyYAML: the core dependencies), so the
server, the trainer's line simulator and the camera side can all use it; ``engine`` never imports it.
The storage modules also need SQLAlchemy, Alembic and psycopg (the ``serve`` extra); nothing else
here imports them.
"""
