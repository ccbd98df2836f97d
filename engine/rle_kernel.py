"""The compiled kernel of :func:`engine.rle.encode_batch` (numba; imported only where numba is installed).

One pass over the masks finds the runs and writes their text. The masks are read as 64-bit words of
eight neighbouring pixels of a row, walking down each group of eight columns: a word equal to the
one above it holds no run boundary (in column-major numbering a boundary is a pixel whose upper
neighbour differs, or, in the top row, whose predecessor at the bottom of the previous column
differs), so on a line's frames, where defects are blobs, almost every word costs one load and one
compare. The boundaries of the group's eight columns are then written, column by column, as the
ASCII digits of "start length" pairs into one growing byte buffer for the whole batch.
"""

from __future__ import annotations

import numpy as np

from engine.fastpost_kernel import compiled

_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH = np.uint64(0x8080808080808080)


@compiled
def _flags(word):  # pragma: no cover - compiled
    """One byte per pixel of ``word``: 1 where the pixel is non-zero, else 0."""
    return ((((word & _LOW7) + _LOW7) | word) & _HIGH) >> np.uint64(7)


@compiled
def _reserve(buf, end, needed):  # pragma: no cover - compiled
    """``buf``, or a copy twice as large where ``needed`` more bytes after ``end`` do not fit."""
    if end + needed <= buf.shape[0]:
        return buf
    grown = np.empty(max(2 * buf.shape[0], end + needed), dtype=np.uint8)
    grown[:end] = buf[:end]
    return grown


@compiled
def _write_int(buf, end, value):  # pragma: no cover - compiled
    """Writes the decimal digits of ``value`` (>= 0) at ``buf[end:]``; returns the new end.

    Unsigned arithmetic: a division by ten compiles to a multiply and a shift."""
    rest = np.uint64(value)
    digits = 1
    power = np.uint64(10)
    while rest >= power and digits < 19:
        power *= np.uint64(10)
        digits += 1
    at = end + digits - 1
    while True:
        quotient = rest // np.uint64(10)
        buf[at] = np.uint8(np.uint64(48) + rest - quotient * np.uint64(10))
        rest = quotient
        at -= 1
        if rest == 0:
            return end + digits


@compiled
def _write_pair(buf, end, first, start, length):  # pragma: no cover - compiled
    """Appends "start length" (1-based start), after a space unless it is the mask's first pair."""
    buf = _reserve(buf, end, 48)
    if not first:
        buf[end] = 32
        end += 1
    end = _write_int(buf, end, start + 1)
    buf[end] = 32
    return buf, _write_int(buf, end + 1, length)


@compiled
def _group_boundaries(plane, group, left, rows, counts):  # pragma: no cover - compiled
    """Rows of the run boundaries of the eight columns of word ``group``, per column.

    ``left`` is the flag (0/1) of the pixel at the bottom of the column before the group; returns
    that flag for the group's last column. ``rows[j, :counts[j]]`` are the boundary rows of column j.
    """
    height = plane.shape[0]
    counts[:] = 0
    # The top row's predecessors are the bottom pixels of the previous columns: shift them one column.
    above = (_flags(plane[height - 1, group]) << np.uint64(8)) | np.uint64(left)
    raw_above = ~plane[0, group]  # differs from row 0: row 0 is always checked against ``above``
    for r in range(height):
        raw = plane[r, group]
        if raw == raw_above:
            continue
        flags = _flags(raw)
        changed = flags ^ above
        if changed:
            for j in range(8):
                if (changed >> np.uint64(8 * j)) & np.uint64(1):
                    rows[j, counts[j]] = r
                    counts[j] += 1
        above = flags
        raw_above = raw
    return int((_flags(plane[height - 1, group]) >> np.uint64(56)) & np.uint64(1))


@compiled
def encode_planes(words, width, buf, ends):  # pragma: no cover - compiled
    """RLE text of every mask plane into ``buf``.

    Args:
        words: uint64 ``[M, H, ceil(W / 8)]``: the planes' bytes (zero-padded to whole words).
        width: W, the planes' width in pixels (the padding columns are never written).
        buf: uint8 buffer to write into (grown as needed).
        ends: int64 ``[M]``, filled with the end offset of each plane's text in the returned buffer.

    Returns:
        The buffer holding all the text (``buf``, or a larger copy).
    """
    height = words.shape[1]
    rows = np.empty((8, height), dtype=np.int64)
    counts = np.zeros(8, dtype=np.int64)
    end = 0
    for m in range(words.shape[0]):
        plane = words[m]
        open_at = -1  # column-major index of the open run's first pixel, -1 when none is open
        first = True
        left = 0
        for group in range(words.shape[2]):
            left = _group_boundaries(plane, group, left, rows, counts)
            for j in range(min(8, width - 8 * group)):
                base = (8 * group + j) * height
                for i in range(counts[j]):
                    at = base + rows[j, i]
                    if open_at < 0:
                        open_at = at
                    else:
                        buf, end = _write_pair(buf, end, first, open_at, at - open_at)
                        first = False
                        open_at = -1
        if open_at >= 0:
            buf, end = _write_pair(buf, end, first, open_at, height * width - open_at)
        ends[m] = end
    return buf
