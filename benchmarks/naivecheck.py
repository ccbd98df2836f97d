"""``bench throughput``'s check: every row's outputs compared with the naive pipeline's on the same frames.

The frames are the first ``--check-frames`` of the synthetic pool the rows are timed on, or, with
``--check-data DIR``, the first images (by name) of a Severstal-format folder (``train_images/``) or
a plain folder of images: frames like those the model was trained for, on which a trained model's
reduced-precision rows are meant to hold their parity. Timings always use the synthetic pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.naive import NaiveResult, agreement, agreement_band
from toolchain.parity import tolerance_for

#: ``source`` of checks on the timed frames.
SYNTHETIC_POOL = "synthetic pool"


@dataclass
class NaiveCheck:
    """The check frames, where they came from, and the naive pipeline's outputs on them.

    Attributes:
        frames: uint8 ``[N, H, W]`` frames every row is run on.
        source: :data:`SYNTHETIC_POOL`, or the ``--check-data`` folder.
        files: the folder's image files used, in order (empty for the synthetic pool).
        naive: the naive pipeline's outputs on ``frames`` (:meth:`run_naive`).
        meta: the naive pipeline's model metadata (thresholds and minimum areas of the comparison).
    """

    frames: np.ndarray
    source: str
    files: list[str] = field(default_factory=list)
    naive: NaiveResult | None = None
    meta: Any = None

    def run_naive(self, pipeline: Any) -> None:
        """Runs the naive pipeline on the check frames: the outputs every row is compared with."""
        self.naive = pipeline.run(self.frames)
        self.meta = pipeline.metadata

    def note(self) -> str:
        """One line under the table saying which frames the check used."""
        if not self.files:
            return (f"naive check: every row's outputs compared with the naive pipeline's on the first "
                    f"{len(self.frames)} frames of the synthetic pool (the timed frames)")
        return (f"naive check: every row's outputs compared with the naive pipeline's on --check-data "
                f"{self.source} with {len(self.frames)} images ({', '.join(self.files)}); timings on the "
                f"synthetic pool")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "frames": len(self.frames), "files": list(self.files),
                "naive_counts": None if self.naive is None else self.naive.counts.tolist()}


def check_frames(check_data: Path | None, count: int, pool: list[bytes], meta: Any) -> NaiveCheck:
    """The ``count`` frames of the check: of ``check_data`` where given, else of the JPEG ``pool``.

    Raises:
        FileNotFoundError, ValueError: the folder is missing, holds fewer than ``count`` images, or an
            image is unreadable or not of the model's input size (the error names the file).
    """
    from benchmarks.pipeline import decode_frames, read_sized
    from toolchain.build_openvino import image_files

    if check_data is None:
        return NaiveCheck(decode_frames(pool[:count], *meta.input_size), SYNTHETIC_POOL)
    files = image_files(check_data, flag="--check-data")
    if len(files) < count:
        raise ValueError(f"--check-data {check_data}: {len(files)} images, --check-frames asks for {count}")
    frames = read_sized(files[:count], meta.input_size, "--check-data", check_data)
    return NaiveCheck(frames, str(check_data), [p.name for p in files[:count]])


def check_against_naive(name: str, path: Path, backend: Any, check: NaiveCheck, notes: list[str]) -> dict | None:
    """One row's agreement with the naive pipeline on the check frames (None where its batch cannot
    hold them); a note where they differ beyond tolerance."""
    if backend.max_batch_size is not None and len(check.frames) > backend.max_batch_size:
        notes.append(f"{name} {path.name}: not compared with the naive pipeline "
                     f"(--check-frames above the max batch {backend.max_batch_size})")
        return None
    band = agreement_band(str(backend.precision), str(backend.device))
    allowed = tolerance_for(backend.precision).max_mask_mismatch if backend.precision in ("bf16", "int8") else 0.0
    meta = check.meta
    a = agreement(check.naive, backend.infer(check.frames), meta.thresholds, meta.min_areas, band, allowed)
    if not a.equal:
        notes.append(
            f"{name} {path.name}: outputs DIFFER from the naive pipeline's beyond tolerance "
            f"({a.differing_pixels} mask pixels outside the +-{band} band, "
            f"{a.count_violations} counts, {a.present_violations} labels)"
        )
    return {"backend": name, "model": path.name, "frames": len(check.frames), "source": check.source,
            "precision": backend.precision, **a.to_dict()}
