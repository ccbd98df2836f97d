"""Coils, not frames: the line's geometry (:mod:`coils.line`), a line folder's frame index
(:mod:`coils.line_folder`) and defect records in coil coordinates (:mod:`coils.records`).

The words are CONVENTIONS.md's: a **coil** is one strip (``coil_id``); positions are millimetres
**along** it from the coil's head and **across** it from the operator-side edge; a camera covers a
**lane**; a **defect record** is one physical defect merged from every frame and lane it touches.

This package imports ``engine`` only (numpy, OpenCV and PyYAML: the core dependencies), so the
server, the trainer's line simulator and the camera side can all use it; ``engine`` never imports it.
"""
