"""The compiled kernel of :func:`engine.rle.encode_batch` (numba; imported only where numba is installed).

One pass over the masks finds the runs, and the text is written as they are found. The masks are
read as 64-bit words of eight neighbouring pixels of a row. In column-major numbering a run boundary
is a pixel whose upper neighbour differs (in the top row: the pixel at the bottom of the previous
column), so only words that differ from the word above them can hold one: a row-major pass over
each plane, one vectorised comparison per row, lists them (on a line's masks, where defects are
blobs, a few per thousand words). Then, group of eight columns by group, the listed words' pixels
give each column's boundary rows, written as the ASCII digits of "start length" pairs into one
growing byte buffer for the whole batch.
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
def _changed_words(plane, changed_rows, starts, scratch):  # pragma: no cover - compiled
    """The rows of every word that differs from the word above it, bucketed by group of eight columns.

    One row-major pass (contiguous; a row equal to the one above it is skipped after one vectorised
    comparison); row 0 of every group is always listed (its pixels follow the bottom of the previous columns).
    ``changed_rows[starts[g]:starts[g + 1]]`` are group g's rows, in order; ``scratch`` holds
    ``2 * H * G`` int32.
    """
    height, groups = plane.shape
    hit_rows, hit_groups = scratch[: height * groups], scratch[height * groups :]
    starts[:] = 0
    n = 0
    for g in range(groups):
        hit_rows[n], hit_groups[n] = 0, g
        starts[g + 1] += 1
        n += 1
    for r in range(1, height):
        row, above = plane[r], plane[r - 1]
        diff = np.uint64(0)
        for g in range(groups):  # vectorised: most rows of a line's masks equal the row above
            diff |= row[g] ^ above[g]
        if diff:
            for g in range(groups):
                if row[g] != above[g]:
                    hit_rows[n], hit_groups[n] = r, g
                    starts[g + 1] += 1
                    n += 1
    for g in range(groups):
        starts[g + 1] += starts[g]
    placed = starts[:-1].copy()
    for i in range(n):  # a stable counting sort: each group's rows stay in row order
        changed_rows[placed[hit_groups[i]]] = hit_rows[i]
        placed[hit_groups[i]] += 1


@compiled
def _group_boundaries(plane, group, left, changed_rows, rows, counts):  # pragma: no cover - compiled
    """Rows of the run boundaries of the eight columns of word ``group``, per column, from the rows
    where its word changes (``changed_rows``).

    ``left`` is the flag (0/1) of the pixel at the bottom of the column before the group; returns
    that flag for the group's last column. ``rows[j, :counts[j]]`` are the boundary rows of column j.
    """
    height = plane.shape[0]
    counts[:] = 0
    bottom = _flags(plane[height - 1, group])
    for r in changed_rows:
        if r == 0:  # the top row's predecessors: the bottom pixels of the previous columns, shifted one column
            above = (bottom << np.uint64(8)) | np.uint64(left)
        else:
            above = _flags(plane[r - 1, group])
        changed = _flags(plane[r, group]) ^ above
        for j in range(8):
            if (changed >> np.uint64(8 * j)) & np.uint64(1):
                rows[j, counts[j]] = r
                counts[j] += 1
    return int((bottom >> np.uint64(56)) & np.uint64(1))


@compiled
def _encode_plane(plane, width, buf, end, changed_rows, starts, rows, counts):  # pragma: no cover - compiled
    """Appends one plane's RLE text at ``buf[end:]``; returns (the buffer, the new end)."""
    height = plane.shape[0]
    open_at = -1  # column-major index of the open run's first pixel, -1 when none is open
    first = True
    left = 0
    for group in range(plane.shape[1]):
        left = _group_boundaries(plane, group, left, changed_rows[starts[group] : starts[group + 1]], rows, counts)
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
    return buf, end


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
    height, groups = words.shape[1], words.shape[2]
    changed_rows = np.empty(height * groups, dtype=np.int32)
    scratch = np.empty(2 * height * groups, dtype=np.int32)
    starts = np.empty(groups + 1, dtype=np.int64)
    rows = np.empty((8, height), dtype=np.int64)
    counts = np.zeros(8, dtype=np.int64)
    end = 0
    for m in range(words.shape[0]):
        _changed_words(words[m], changed_rows, starts, scratch)
        buf, end = _encode_plane(words[m], width, buf, end, changed_rows, starts, rows, counts)
        ends[m] = end
    return buf
