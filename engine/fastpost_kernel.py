"""The compiled kernel of :mod:`engine.fastpost` (numba; imported only where numba is installed).

Each output pixel is ONNX Runtime's half-pixel bilinear value, computed with its formula and in
its order of operations (``(dy0*dx0)*p00 + (dy0*dx1)*p01 + (dy1*dx0)*p10 + (dy1*dx1)*p11`` in
float32, which makes it bit-identical to the graph's resize), then compared with the threshold and
counted. Two things make it cheap:

- an output row whose two source rows hold no probability within ``margin`` of the threshold or
  above is all zeros: it is cleared without arithmetic (a convex combination of values below
  ``t - margin`` stays below ``t``; the margin, 1e-5, is far above float32 rounding of a
  four-term sum of values <= 1);
- the source rows are expanded to the output's columns once per source row, so the per-row loop
  reads contiguous arrays and vectorises.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit


def compiled(function=None, *, nogil: bool = True):
    """``function`` compiled without the GIL, its machine code cached on disk where numba can write
    a cache (beside this file, else its per-user directory); compiled at each start where it cannot.

    ``@compiled(nogil=False)`` keeps the GIL: for a kernel that calls back into Python (``objmode``).
    """
    if function is None:
        return functools.partial(compiled, nogil=nogil)
    try:
        return njit(cache=True, nogil=nogil, boundscheck=False)(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available" (read-only install, no HOME)
        return njit(cache=False, nogil=nogil, boundscheck=False)(function)


@compiled
def _expand(row, xi0, xi1, at0, at1):  # pragma: no cover - compiled
    for x in range(xi0.shape[0]):
        at0[x] = row[xi0[x]]
        at1[x] = row[xi1[x]]


@compiled
def decide_plane(p, t, margin, yi0, yi1, wy0, wy1, xi0, xi1, wx0, wx1, out, scratch):  # pragma: no cover
    """Masks of one image and class into ``out`` ``[H, W]`` (uint8); returns their pixel count.

    ``scratch`` is float32 ``[4, W]``: two source rows, each at the columns ``xi0`` and ``xi1``.
    """
    h, w = p.shape
    rows_below = np.empty(h, np.bool_)
    low = t - margin
    for j in range(h):
        below = True
        for q in range(w):
            if not p[j, q] < low:  # NaN-safe: a NaN row is computed, as the graph would
                below = False
                break
        rows_below[j] = below
    top, bottom, top_row, bottom_row = 0, 2, -1, -1  # scratch rows holding each source row's expansion
    total = 0
    for y in range(out.shape[0]):
        j0, j1 = yi0[y], yi1[y]
        row = out[y]
        if rows_below[j0] and rows_below[j1]:
            row[:] = 0
            continue
        if top_row != j0:
            if bottom_row == j0:  # the row below became the row above: reuse its expansion
                top, bottom, top_row, bottom_row = bottom, top, bottom_row, top_row
            else:
                _expand(p[j0], xi0, xi1, scratch[top], scratch[top + 1])
                top_row = j0
        if bottom_row != j1:
            _expand(p[j1], xi0, xi1, scratch[bottom], scratch[bottom + 1])
            bottom_row = j1
        total += _row(scratch[top], scratch[top + 1], scratch[bottom], scratch[bottom + 1], wy0[y], wy1[y], wx0, wx1,
                      t, row)
    return total


@compiled
def _row(e00, e01, e10, e11, a, b, wx0, wx1, t, row):  # pragma: no cover - compiled
    count = 0
    for x in range(row.shape[0]):
        v = (a * wx0[x]) * e00[x] + (a * wx1[x]) * e01[x] + (b * wx0[x]) * e10[x] + (b * wx1[x]) * e11[x]
        hit = v >= t
        row[x] = hit
        count += hit
    return count


@compiled
def decide(probs, thresholds, margin, yi0, yi1, wy0, wy1, xi0, xi1, wx0, wx1, masks, counts, first, last):  # pragma: no cover
    """:func:`decide_plane` for the planes ``first..last-1`` of ``probs`` ``[N, C, h, w]`` (flattened
    N*C order), into ``masks`` ``[N, C, H, W]`` and ``counts`` ``[N, C]``."""
    c = probs.shape[1]
    scratch = np.empty((4, xi0.shape[0]), np.float32)
    for plane in range(first, last):
        i, k = plane // c, plane % c
        counts[i, k] = decide_plane(probs[i, k], thresholds[k], margin, yi0, yi1, wy0, wy1, xi0, xi1, wx0, wx1,
                                    masks[i, k], scratch)
