"""The compiled kernel of :mod:`coils.labelling` (numba; imported only where numba is installed).

Connected components (8-connectivity) of one 2-D mask from its row runs: each row's runs of set
pixels are found, a run is joined (union-find) to every run of the row above that it touches
(overlapping or diagonal), and each set of runs is one component. The components are numbered in
OpenCV's order (:mod:`coils.labelling` says why that order), their stats gathered from the runs
and their box masks filled run by run: one pass over the pixels, the rest over runs.
"""

from __future__ import annotations

import numpy as np

from engine.fastpost_kernel import compiled


@compiled
def _find(parent, i):  # pragma: no cover - compiled
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


#: Eight set pixels (bytes of 1) read as one word.
_ONES = np.uint64(0x0101010101010101)


#: Runs a first scan makes room for; a mask with more is scanned again with room for all of them.
FIRST_ROOM = 4096


@compiled
def _put(runs, n, row, start, end):  # pragma: no cover - compiled
    """Stores run ``n`` where there is room (past it, only counts); returns the new count."""
    if n < runs.shape[0]:
        runs[n, 0], runs[n, 1], runs[n, 2] = row, start, end
    return n + 1


@compiled
def _scan(grid, words, runs, first):  # pragma: no cover - compiled
    """Stores every run of set pixels (row, start, end exclusive), row by row, in ``runs`` while
    there is room, and each row's first run in ``first``; returns how many runs there are.

    ``words`` is ``grid`` read as uint64 ``[rows, cols // 8]``: eight pixels inside or outside a
    run are passed over at once, and 64 clear ones, so most of a mask costs a compare per 64 pixels.
    """
    h, w = grid.shape
    n = 0
    zero = np.uint64(0)
    nw = words.shape[1]
    for r in range(h):
        first[r] = n
        inside = False
        s = 0
        q = 0
        while True:
            if inside:
                while q < nw and words[r, q] == _ONES:
                    q += 1
            else:
                while q + 8 <= nw and (words[r, q] | words[r, q + 1] | words[r, q + 2] | words[r, q + 3] | words[r, q + 4]
                                       | words[r, q + 5] | words[r, q + 6] | words[r, q + 7]) == zero:
                    q += 8  # 64 clear pixels at a time: most of a mask
                while q < nw and words[r, q] == zero:
                    q += 1
            c, stop = 8 * q, min(8 * q + 8, w) if q < nw else w
            if c >= stop:
                break
            while c < stop:
                if (grid[r, c] != 0) != inside:
                    if inside:
                        n = _put(runs, n, r, s, c)
                    else:
                        s = c
                    inside = not inside
                c += 1
            if q >= nw:
                break
            q += 1
        if inside:
            n = _put(runs, n, r, s, w)
    first[h] = n
    return n


@compiled
def _runs(grid, words):  # pragma: no cover - compiled
    """Row, start and end (exclusive) of every run of set pixels, row by row, and each row's first run."""
    first = np.empty(grid.shape[0] + 1, np.int64)
    runs = np.empty((FIRST_ROOM, 3), np.int64)
    n = _scan(grid, words, runs, first)
    if n > FIRST_ROOM:
        runs = np.empty((n, 3), np.int64)
        _scan(grid, words, runs, first)
    return runs[:n, 0], runs[:n, 1], runs[:n, 2], first


@compiled
def _join(starts, ends, first, parent):  # pragma: no cover - compiled
    """Unions each run with the runs of the row above that it touches (8-connectivity)."""
    for r in range(1, first.shape[0] - 1):
        j, j_end = first[r - 1], first[r]
        for i in range(first[r], first[r + 1]):
            while j < j_end and ends[j] < starts[i]:  # ends before the run's left diagonal neighbour
                j += 1
            k = j
            while k < j_end and starts[k] <= ends[i]:  # starts at most at the run's right diagonal neighbour
                a, b = _find(parent, i), _find(parent, k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                k += 1


@compiled
def _numbered(rows, starts, n_cols, parent):  # pragma: no cover - compiled
    """Each run's component number, components in OpenCV's order; and how many there are.

    OpenCV numbers components by the first 2x2 block (in raster order over the box of the set
    pixels) holding one of their pixels; two components never share a block (8-connectivity).
    """
    n_runs = rows.shape[0]
    r0 = rows[0] if n_runs else 0
    c0 = n_cols
    for i in range(n_runs):
        c0 = min(c0, starts[i])
    block_cols = (n_cols + 1) // 2 + 1
    key = np.full(n_runs, 1 << 62, np.int64)
    root = np.empty(n_runs, np.int64)
    for i in range(n_runs):
        root[i] = _find(parent, i)
        at = ((rows[i] - r0) // 2) * block_cols + (starts[i] - c0) // 2
        if at < key[root[i]]:
            key[root[i]] = at
    roots = np.flatnonzero(root == np.arange(n_runs))
    roots = roots[np.argsort(key[roots], kind="mergesort")]
    number = np.empty(n_runs, np.int64)
    for k in range(roots.shape[0]):
        number[roots[k]] = k
    for i in range(n_runs):
        number[i] = number[root[i]]
    return number, roots.shape[0]


@compiled
def _stats(rows, starts, ends, number, n, shape, owned, probs, has_probs):  # pragma: no cover - compiled
    """Per component: top, left, height, width, pixels, owned pixels; and the largest probability inside."""
    owned_before = np.zeros(owned.shape[0] + 1, np.int64)
    for c in range(owned.shape[0]):
        owned_before[c + 1] = owned_before[c] + (1 if owned[c] else 0)
    stats = np.zeros((n, 6), np.int64)
    bottom = np.zeros(n, np.int64)
    right = np.zeros(n, np.int64)
    stats[:, 0] = shape[0]
    stats[:, 1] = shape[1]
    peaks = np.full(n, -np.inf, np.float32)
    for i in range(rows.shape[0]):
        k = number[i]
        stats[k, 0] = min(stats[k, 0], rows[i])
        stats[k, 1] = min(stats[k, 1], starts[i])
        bottom[k] = max(bottom[k], rows[i] + 1)
        right[k] = max(right[k], ends[i])
        stats[k, 4] += ends[i] - starts[i]
        stats[k, 5] += owned_before[ends[i]] - owned_before[starts[i]]
        if has_probs:
            for c in range(starts[i], ends[i]):
                v = probs[rows[i], c]
                if v > peaks[k] or v != v:  # a NaN inside makes the peak NaN, as numpy's max does
                    peaks[k] = v
    stats[:, 2] = bottom - stats[:, 0]
    stats[:, 3] = right - stats[:, 1]
    return stats, peaks


@compiled
def label_runs(grid, words, owned, probs, has_probs):  # pragma: no cover - compiled
    """The components of ``grid`` (``[rows, cols]`` uint8, nonzero = set) in OpenCV's order.

    Args:
        words: ``grid``'s rows read as uint64 ``[rows, cols // 8]`` (their first ``cols // 8 * 8`` pixels).
        owned: bool ``[cols]``: the columns whose pixels count as owned.
        probs: float32 ``[rows, cols]`` when ``has_probs``, else any float32 2-D array.

    Returns:
        ``stats`` int64 ``[n, 6]`` (top, left, height, width, pixels, owned pixels), ``peaks`` float32
        ``[n]`` (the largest probability inside; -inf without ``has_probs``), ``offsets`` int64 ``[n + 1]``
        (multiples of 8) and ``crops`` bool: component ``k``'s box mask is the first ``height * width``
        of ``crops[offsets[k]:offsets[k + 1]]``, row-major; the rest of that stretch is clear.
    """
    rows, starts, ends, first = _runs(grid, words)
    parent = np.arange(rows.shape[0])
    _join(starts, ends, first, parent)
    number, n = _numbered(rows, starts, grid.shape[1], parent)
    stats, peaks = _stats(rows, starts, ends, number, n, grid.shape, owned, probs, has_probs)
    offsets = np.zeros(n + 1, np.int64)
    for k in range(n):  # each box mask starts on a byte of the packed buffer: packed all at once, sliced
        offsets[k + 1] = offsets[k] + (stats[k, 2] * stats[k, 3] + 7) // 8 * 8
    crops = np.zeros(offsets[n], np.bool_)
    for i in range(rows.shape[0]):
        k = number[i]
        at = offsets[k] + (rows[i] - stats[k, 0]) * stats[k, 3] - stats[k, 1]
        crops[at + starts[i]:at + ends[i]] = True
    return stats, peaks, offsets, crops
