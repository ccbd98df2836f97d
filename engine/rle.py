"""Run-length encoding in the Kaggle/Severstal convention: the one implementation in the project.

Pixels are numbered from 1, top to bottom, then left to right (column-major, Fortran order).
An encoding is "start length" pairs separated by single spaces; an empty mask is the empty string.

Everything that reads or writes masks as text calls this module: the training data loader, the
evaluation, the backends, the server and the client.

:func:`encode_batch`, which the backends and the server call for every frame, runs a compiled kernel
(:mod:`engine.rle_kernel`, numba: the ``cpu`` extra) that scans the masks and writes the text in one
pass; without numba it runs :func:`encode_batch_numpy`, which makes the same strings.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from engine.kernels import import_kernel

__all__ = ["decode", "decode_many", "encode", "encode_batch", "encode_batch_numpy", "encode_batch_torch",
           "runs_to_string"]

log = logging.getLogger(__name__)

#: First size of the kernel's text buffer (it grows as needed): a line's batch of frames fits.
_TEXT_BYTES = 1 << 16


def _column_range(column_any: np.ndarray) -> tuple[int, int] | None:
    cols = np.flatnonzero(column_any)
    if cols.size == 0:
        return None
    return int(cols[0]), int(cols[-1]) + 1


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts (0-based) and lengths of the runs of True in a flat bool vector."""
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        edges = np.concatenate(([0], edges))
    if flat[-1]:
        edges = np.concatenate((edges, [flat.size]))
    starts = edges[0::2]
    return starts, edges[1::2] - starts


def runs_to_string(starts: np.ndarray, lengths: np.ndarray) -> str:
    """Formats 1-based run starts and lengths as "start length start length ..."."""
    if len(starts) == 0:
        return ""
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2] = starts
    pairs[1::2] = lengths
    return " ".join(map(str, pairs.tolist()))


def _encode_2d(mask: np.ndarray, column_any: np.ndarray) -> str:
    span = _column_range(column_any)
    if span is None:
        return ""
    # Column-major order means whole columns are contiguous in the pixel numbering: only the
    # columns holding a defect need scanning, offset by the pixels of the columns before them.
    c0, c1 = span
    flat = np.ascontiguousarray(mask[:, c0:c1].T).ravel() != 0
    starts, lengths = _runs(flat)
    return runs_to_string(starts + 1 + c0 * mask.shape[0], lengths)


def encode(mask: np.ndarray) -> str:
    """Encodes a 2-D mask (any dtype; non-zero is foreground) as a Kaggle RLE string."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode expects a 2-D (height, width) mask, got shape {mask.shape}")
    return _encode_2d(mask, mask.any(axis=0))


@functools.lru_cache(maxsize=1)
def _kernel() -> ModuleType | None:
    """The compiled RLE kernel module, or None where numba is not installed (or the machine is
    big-endian: the kernel reads eight pixels as one little-endian word)."""
    if sys.byteorder != "little":
        log.info("RLE in numpy: the kernel needs a little-endian machine")
        return None
    module, why_not = import_kernel("engine.rle_kernel")
    if module is None:
        log.info("RLE in numpy: %s", why_not)
    return module


def _check_batch(masks: np.ndarray, name: str) -> None:
    if masks.ndim != 4:
        raise ValueError(f"{name} expects masks of shape [N, C, H, W], got {masks.shape}")


def encode_batch(masks: np.ndarray) -> list[list[str]]:
    """Encodes masks ``[N, C, H, W]`` (any dtype; non-zero is foreground) into ``N`` lists of ``C``
    RLE strings: the compiled kernel where numba is installed, else :func:`encode_batch_numpy`."""
    masks = np.asarray(masks)
    _check_batch(masks, "encode_batch")
    kernel = _kernel()
    n, c, h, w = masks.shape
    if kernel is None or n * c * h * w == 0:
        return encode_batch_numpy(masks)
    ends = np.empty(n * c, dtype=np.int64)
    text_bytes = kernel.encode_planes(_words(masks), w, np.empty(_TEXT_BYTES, dtype=np.uint8), ends)
    text = text_bytes[: ends[-1]].tobytes().decode("ascii")
    bounds = [0, *ends.tolist()]
    texts = [text[bounds[m] : bounds[m + 1]] for m in range(n * c)]
    return [texts[i * c : (i + 1) * c] for i in range(n)]


def _words(masks: np.ndarray) -> np.ndarray:
    """The masks' planes as the kernel reads them: uint64 words ``[N * C, H, ceil(W / 8)]`` of eight
    pixels each (a copy, zero-padded on the right, only where the layout or the dtype needs one)."""
    n, c, h, w = masks.shape
    if masks.dtype == np.bool_:
        masks = masks.view(np.uint8)
    elif masks.dtype != np.uint8:
        masks = (masks != 0).view(np.uint8)
    planes = masks.reshape(n * c, h, w)
    if w % 8 or not planes.flags.c_contiguous or planes.ctypes.data % 8:
        padded = np.zeros((n * c, h, -(-w // 8) * 8), dtype=np.uint8)
        padded[..., :w] = planes
        planes = padded
    return planes.view(np.uint64)


def encode_batch_numpy(masks: np.ndarray) -> list[list[str]]:
    """:func:`encode_batch` in numpy: the fallback without numba, and the kernel's reference in tests.

    Which masks are empty, and which columns of the others hold defects, is found for the
    whole batch in one vectorised reduction; only non-empty masks are then scanned, and only
    over their defect columns (most (image, class) pairs on a line are empty).
    """
    masks = np.asarray(masks)
    _check_batch(masks, "encode_batch_numpy")
    n, c = masks.shape[:2]
    column_any = masks.any(axis=2)  # [N, C, W]
    nonempty = column_any.any(axis=2)  # [N, C]
    out = [[""] * c for _ in range(n)]
    for i, k in zip(*np.nonzero(nonempty)):
        out[i][k] = _encode_2d(masks[i, k], column_any[i, k])
    return out


def encode_batch_torch(masks: Any) -> list[list[str]]:
    """Encodes torch masks ``[N, C, H, W]`` (any device, typically CUDA) like :func:`encode_batch`.

    Run boundaries are found where the masks live, with one ``nonzero`` over the whole batch, and
    copied to the host once per batch (not once per mask); the host only formats the strings.
    """
    import torch

    if masks.dim() != 4:
        raise ValueError(f"encode_batch_torch expects masks of shape [N, C, H, W], got {tuple(masks.shape)}")
    n, c, h, w = (int(v) for v in masks.shape)
    # Column-major pixel order: transpose to [N, C, W, H] and flatten each mask; a zero pad on both
    # ends makes every run open and close inside the row, so boundaries come in (start, end) pairs.
    flat = (masks != 0).transpose(2, 3).reshape(n * c, h * w)
    padded = torch.nn.functional.pad(flat.to(torch.uint8), (1, 1))
    edges = torch.nonzero(padded[:, 1:] != padded[:, :-1]).cpu().numpy()  # [K, 2] (mask, position)
    out = [[""] * c for _ in range(n)]
    if edges.size == 0:
        return out
    rows = edges[0::2, 0]
    starts = edges[0::2, 1]
    lengths = edges[1::2, 1] - starts
    bounds = np.flatnonzero(np.diff(rows)) + 1
    for row, s, length in zip(
        rows[np.concatenate(([0], bounds))], np.split(starts, bounds), np.split(lengths, bounds)
    ):
        out[row // c][row % c] = runs_to_string(s + 1, length)
    return out


def _parse(rle: str) -> np.ndarray:
    tokens = rle.split()
    if len(tokens) % 2:
        raise ValueError(f"RLE has an odd number of tokens ({len(tokens)}): expected 'start length' pairs")
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(t for t in tokens if not _is_int(t))
        raise ValueError(f"RLE token {bad!r} is not an integer") from None
    return values


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def decode(rle: str | float | None, height: int, width: int) -> np.ndarray:
    """Decodes a Kaggle RLE string into a ``(height, width)`` uint8 0/1 mask.

    ``None``, NaN and the empty (or all-blank) string decode to an empty mask.

    Raises:
        ValueError: odd token count, non-integer token, start < 1, length < 1, a run past
            ``height * width``, or runs out of order or overlapping.
    """
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    total = height * width
    if rle is None or (isinstance(rle, float) and np.isnan(rle)) or not str(rle).strip():
        return np.zeros((height, width), dtype=np.uint8)
    values = _parse(str(rle))
    starts, lengths = values[0::2], values[1::2]
    if (starts < 1).any():
        bad = int(starts[starts < 1][0])
        raise ValueError(f"RLE start {bad} is below 1: pixels are numbered from 1")
    if (lengths < 1).any():
        i = int(np.flatnonzero(lengths < 1)[0])
        raise ValueError(f"RLE run starting at {int(starts[i])} has length {int(lengths[i])}: must be >= 1")
    ends = starts + lengths - 1  # inclusive, 1-based
    if (ends > total).any():
        i = int(np.flatnonzero(ends > total)[0])
        raise ValueError(
            f"RLE run {int(starts[i])}+{int(lengths[i])} ends at pixel {int(ends[i])}, "
            f"past the {height}x{width} mask ({total} pixels)"
        )
    if len(starts) > 1 and (starts[1:] <= ends[:-1]).any():
        i = int(np.flatnonzero(starts[1:] <= ends[:-1])[0])
        raise ValueError(
            f"RLE runs are unsorted or overlapping: run at {int(starts[i + 1])} follows the run "
            f"{int(starts[i])}+{int(lengths[i])}"
        )
    # Column-major pixel indices of every run, built without a per-pixel Python loop: the
    # cost follows the number of defect pixels, not the frame size.
    offsets = np.cumsum(lengths) - lengths
    index = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - 1 - offsets, lengths)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[index % height, index // height] = 1
    return mask


def decode_many(rles: Sequence[str], height: int, width: int) -> np.ndarray:
    """Decodes one RLE per class into a ``[C, height, width]`` uint8 mask stack."""
    return np.stack([decode(r, height, width) for r in rles]) if rles else np.zeros((0, height, width), np.uint8)
