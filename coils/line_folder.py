"""A line folder: frames as cameras send them, with their coil and strip position (the one owner of its files).

``trainer synth-line`` writes one, ``server client --line`` streams it, tests push its true masks
through :class:`coils.records.RecordBuilder` and compare with its truth::

    line.yaml        the line's geometry (coils.line)
    frames.csv       camera_id,frame_id,coil_id,position_mm,file   one row per frame, each camera's in frame order
    masks.csv        camera_id,frame_id,class_id,rle               the true masks (Kaggle RLE), non-empty ones only
    truth.csv        one row per planted defect (TruthDefect's fields), in coil coordinates
    truth.json       the same, with the line and each coil's length
    <camera_id>/     the frames' image files (``file`` is relative to the folder)
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from engine.files import atomic_write

LINE_FILE = "line.yaml"
FRAMES_FILE = "frames.csv"
MASKS_FILE = "masks.csv"
TRUTH_CSV = "truth.csv"
TRUTH_JSON = "truth.json"
FRAME_COLUMNS = ("camera_id", "frame_id", "coil_id", "position_mm", "file")
MASK_COLUMNS = ("camera_id", "frame_id", "class_id", "rle")


@dataclass(frozen=True)
class LineFrame:
    """One frame of a line folder: who took it, which coil and where on it, and its image file."""

    camera_id: str
    frame_id: int
    coil_id: str
    position_mm: float
    file: str  # relative to the folder, '/'-separated


@dataclass(frozen=True)
class TruthDefect:
    """One planted defect in coil coordinates: what one defect record should say.

    Attributes:
        kind: how it was planted: ``plain``, ``boundary`` (over a frame boundary), ``lane`` (over two
            lanes), ``both``, ``long`` (over many frames) or ``roll_mark`` (repeated at a roll's period).
        roll: the roll whose mark it is (``roll_mark`` only), else empty.
    """

    coil_id: str
    class_id: int
    along_start_mm: float
    along_end_mm: float
    across_start_mm: float
    across_end_mm: float
    area_mm2: float
    kind: str
    roll: str = ""


def frames_file(path: str | Path) -> Path:
    """``path`` itself when it is a file, else its ``frames.csv``."""
    path = Path(path)
    return path / FRAMES_FILE if path.is_dir() else path


def write_frames(path: str | Path, frames: Iterable[LineFrame]) -> Path:
    return _write_csv(path, FRAME_COLUMNS, ([getattr(f, c) for c in FRAME_COLUMNS] for f in frames))


def read_frames(path: str | Path) -> list[LineFrame]:
    """The frames of a line folder (or of its ``frames.csv``), in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a wrong header or value, naming the file and line.
    """
    path = frames_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such frames file (a line folder holds {FRAMES_FILE})")
    frames = []
    for number, row in _read_csv(path, FRAME_COLUMNS):
        try:
            frame = LineFrame(row["camera_id"], int(row["frame_id"]), row["coil_id"], float(row["position_mm"]),
                              row["file"])
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        if not frame.camera_id or not frame.coil_id or not frame.file:
            raise ValueError(f"{path}:{number}: camera_id, coil_id and file must not be empty")
        if frame.frame_id < 0 or not math.isfinite(frame.position_mm) or frame.position_mm < 0:
            raise ValueError(f"{path}:{number}: frame_id and position_mm must be >= 0, got {frame.frame_id}, "
                             f"{frame.position_mm}")
        frames.append(frame)
    return frames


def write_masks(path: str | Path, rows: Iterable[tuple[str, int, int, str]]) -> Path:
    """Writes ``(camera_id, frame_id, class_id, rle)`` rows (class ids 1-based)."""
    return _write_csv(path, MASK_COLUMNS, rows)


def read_masks(path: str | Path) -> dict[tuple[str, int], dict[int, str]]:
    """``(camera_id, frame_id) -> {class_id: rle}`` of a line folder's ``masks.csv`` (or of ``path``)."""
    path = Path(path)
    path = path / MASKS_FILE if path.is_dir() else path
    masks: dict[tuple[str, int], dict[int, str]] = {}
    for number, row in _read_csv(path, MASK_COLUMNS):
        try:
            masks.setdefault((row["camera_id"], int(row["frame_id"])), {})[int(row["class_id"])] = row["rle"]
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
    return masks


TRUTH_COLUMNS = tuple(f.name for f in fields(TruthDefect))


def write_truth(folder: str | Path, defects: list[TruthDefect], facts: dict) -> None:
    """``truth.csv`` and ``truth.json`` (``facts`` and the defects) in ``folder``."""
    folder = Path(folder)
    _write_csv(folder / TRUTH_CSV, TRUTH_COLUMNS, ([getattr(d, c) for c in TRUTH_COLUMNS] for d in defects))
    atomic_write(folder / TRUTH_JSON, json.dumps({**facts, "defects": [asdict(d) for d in defects]}, indent=1) + "\n")


def read_truth(folder: str | Path) -> list[TruthDefect]:
    """The planted defects of a line folder's ``truth.csv``."""
    path = Path(folder) / TRUTH_CSV
    defects = []
    for number, row in _read_csv(path, TRUTH_COLUMNS):
        try:
            defects.append(TruthDefect(
                row["coil_id"], int(row["class_id"]),
                *(float(row[c]) for c in TRUTH_COLUMNS[2:7]), row["kind"], row["roll"]))
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
    return defects


def _write_csv(path: str | Path, columns: tuple[str, ...], rows: Iterable) -> Path:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return atomic_write(path, text.getvalue(), make_parents=True)


def _read_csv(path: Path, columns: tuple[str, ...]) -> Iterable[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a CSV whose header must be exactly ``columns``."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != columns:
            raise ValueError(f"{path}: header must be {','.join(columns)}, got {','.join(reader.fieldnames or ())}")
        for row in reader:
            yield reader.line_num, row


__all__ = ["FRAMES_FILE", "FRAME_COLUMNS", "LINE_FILE", "LineFrame", "MASKS_FILE", "MASK_COLUMNS", "TRUTH_CSV",
           "TRUTH_JSON", "TruthDefect", "frames_file", "read_frames", "read_masks", "read_truth", "write_frames",
           "write_masks", "write_truth"]
