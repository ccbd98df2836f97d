"""The compiled search of :mod:`coils.periodic` (numba; imported only where numba is installed).

:func:`search_bands` does for every band in one call what :mod:`coils.periodic`'s numpy path does band
by band (candidate periods, best start, the staged walk, the binomial tail), with the same floats in
the same order: numpy's pairwise sum where the numpy path takes a mean, CPython's ``math.lgamma`` read
from a table, and the walk's line fits called back to the numpy path's own least squares (LAPACK's
last bits decide ties on pixel-quantised positions), so both give the same finds to the last bit. A
dense coil's live window has thousands of bands; the numpy path's per-band calls were most of its
evaluation.
"""

from __future__ import annotations

import math

import numpy as np
from numba import objmode

from coils.periodic import FIRST_TURNS, _fit_line
from engine.fastpost_kernel import compiled


@compiled
def pairwise_sum(values, low, n):  # pragma: no cover - compiled
    """``np.add.reduce(values[low:low + n])`` to the last bit: numpy's pairwise summation, its recursion
    (halves cut at a multiple of 8 down to blocks of at most 128) kept on a stack, since numba's disk cache
    cannot hold a recursive function."""
    starts, sizes, combine = np.empty(192, np.int64), np.empty(192, np.int64), np.empty(192, np.bool_)
    sums = np.empty(64, np.float64)
    starts[0], sizes[0], combine[0] = low, n, False
    top, depth = 0, 0
    while top >= 0:
        start, size, joined = starts[top], sizes[top], combine[top]
        top -= 1
        if joined:  # both halves summed: left + right
            depth -= 1
            sums[depth - 1] += sums[depth]
        elif size <= 128:
            sums[depth] = _block_sum(values, start, size)
            depth += 1
        else:
            half = size // 2
            half -= half % 8
            starts[top + 1], sizes[top + 1], combine[top + 1] = start, size, True
            starts[top + 2], sizes[top + 2], combine[top + 2] = start + half, size - half, False
            starts[top + 3], sizes[top + 3], combine[top + 3] = start, half, False
            top += 3
    return sums[0]


@compiled
def _block_sum(values, low, n):  # pragma: no cover - compiled
    """numpy's pairwise sum of at most 128 values: 8 lanes, then the rest in order."""
    if n < 8:
        total = 0.0
        for i in range(n):
            total += values[low + i]
        return total
    lanes = values[low:low + 8].copy()
    i = 8
    while i < n - n % 8:
        for j in range(8):
            lanes[j] += values[low + i + j]
        i += 8
    total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    while i < n:
        total += values[low + i]
        i += 1
    return total


@compiled(nogil=False)  # it calls back into Python
def fit_line(turns, along, n):  # pragma: no cover - compiled
    """:func:`coils.periodic._fit_line` of the first ``n``: numpy's own least squares, called back in Python, since
    the walk's decisions (``rint``, ``<= tol``) on a coil's pixel-quantised positions hinge on its last bit."""
    with objmode(slope="float64", intercept="float64"):
        fitted = _fit_line(turns[:n], along[:n])
        slope, intercept = float(fitted[0]), float(fitted[1])
    return slope, intercept


#: Line fits :func:`remembered_fit` keeps (by a hash of their inputs, one per place), of at most
#: :data:`REMEMBERED_REPEATS` repeats: a walk's next stage often takes the same repeats again, the band's other
#: candidates and its search after a find the same walks, and the overlapping band the same records (on a dense
#: coil's live window, 8 fits in 10 repeat an earlier one; 99 % have at most 27 repeats).
REMEMBERED, REMEMBERED_REPEATS = 4096, 64  # 4096: the top 12 bits of a 64-bit hash
_FNV_PRIME = np.uint64(1099511628211)


@compiled
def fit_memory():  # pragma: no cover - compiled
    """Room for :data:`REMEMBERED` fits: their counts (0: none), the bits of their turns and along
    positions, their results."""
    return (np.zeros(REMEMBERED, np.int64), np.empty((REMEMBERED, REMEMBERED_REPEATS), np.uint64),
            np.empty((REMEMBERED, REMEMBERED_REPEATS), np.uint64), np.empty((REMEMBERED, 2), np.float64))


@compiled(nogil=False)
def remembered_fit(turns, along, n, memory):  # pragma: no cover - compiled
    """:func:`fit_line`, or the result it gave for the same inputs bit for bit (-0.0 is not 0.0 to LAPACK)."""
    if n > REMEMBERED_REPEATS:
        return fit_line(turns, along, n)
    counts, turn_bits, along_bits, results = memory
    turns_now, along_now = turns[:n].view(np.uint64), along[:n].view(np.uint64)
    code = np.uint64(n)
    for i in range(n):
        code = (code ^ turns_now[i]) * _FNV_PRIME
        code = (code ^ along_now[i]) * _FNV_PRIME
    e = int(code >> np.uint64(52))  # the top bits: a product's low bits see only the inputs' low bits (zero here)
    if counts[e] == n:
        same = True
        for i in range(n):
            if turn_bits[e, i] != turns_now[i] or along_bits[e, i] != along_now[i]:
                same = False
                break
        if same:
            return results[e, 0], results[e, 1]
    slope, intercept = fit_line(turns, along, n)
    counts[e], turn_bits[e, :n], along_bits[e, :n] = n, turns_now, along_now
    results[e, 0], results[e, 1] = slope, intercept
    return slope, intercept


@compiled
def log_binomial_tail(hits, trials, p, lgamma):  # pragma: no cover - compiled
    """:func:`coils.periodic._log_binomial_tail`; ``lgamma[k]`` is ``math.lgamma(k)`` (CPython's, not libm's)."""
    if hits <= 0 or p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    peak = -np.inf
    for k in range(hits, trials + 1):
        term = lgamma[trials + 1] - lgamma[k + 1] - lgamma[trials - k + 1] + k * log_p + (trials - k) * log_q
        if k == hits or term > peak:
            peak = term
    total = 0.0
    for k in range(hits, trials + 1):  # the same terms again, rather than room for them
        total += math.exp(lgamma[trials + 1] - lgamma[k + 1] - lgamma[trials - k + 1] + k * log_p
                          + (trials - k) * log_q - peak)
    return peak + math.log(total)


@compiled
def floor_divide(a, b):  # pragma: no cover - compiled
    """numpy's float64 ``a // b`` (``npy_divmod``), for ``b > 0``."""
    mod = np.fmod(a, b)
    quotient = (a - mod) / b
    if mod != 0.0 and (b < 0) != (mod < 0):
        quotient -= 1.0
    if quotient == 0.0:
        return np.copysign(0.0, a / b)
    whole = math.floor(quotient)
    if quotient - whole > 0.5:
        whole += 1.0
    return whole


@compiled
def candidate_periods(positions, n, min_count, candidates, tol, min_period, max_period):  # pragma: no cover
    """:func:`coils.periodic._candidate_periods` of ``positions[:n]``: an array of up to ``candidates`` periods."""
    span = positions[n - 1] - positions[0]
    reach = min(span / (min_count - 1), max_period) + tol
    size = 0
    for i in range(n):
        j = i + 1
        while j < n and positions[j] <= positions[i] + reach:
            if positions[j] - positions[i] >= min_period:
                size += 1
            j += 1
    periods = np.empty(0, np.float64)
    if size == 0:
        return periods
    diffs, bins = np.empty(size, np.float64), np.empty(size, np.int64)
    k = 0
    for i in range(n):
        j = i + 1
        while j < n and positions[j] <= positions[i] + reach:
            diff = positions[j] - positions[i]
            if diff >= min_period:
                diffs[k], bins[k] = diff, np.int64(np.floor(diff / tol))
                k += 1
            j += 1
    values, counts = _unique_counts(bins)
    pair = counts.copy()
    for t in range(len(values) - 1):
        if values[t + 1] - values[t] == 1:
            pair[t] += counts[t + 1]
    taken = np.zeros(len(values), np.bool_)
    periods = np.empty(min(candidates, len(values)), np.float64)
    found = 0
    near = np.empty(size, np.float64)
    for _ in range(len(periods)):
        top = -1
        for t in range(len(values)):
            if not taken[t] and (top < 0 or pair[t] > pair[top]):
                top = t
        taken[top] = True
        if pair[top] < min_count - 1:
            continue
        m = 0
        for i in range(size):
            if bins[i] == values[top] or bins[i] == values[top] + 1:
                near[m] = diffs[i]
                m += 1
        periods[found] = pairwise_sum(near, 0, m) / m
        found += 1
    return periods[:found]


@compiled
def _unique_counts(bins):  # pragma: no cover - compiled
    """``np.unique(bins, return_counts=True)``."""
    ordered = np.sort(bins)
    values, counts = np.empty(len(ordered), np.int64), np.zeros(len(ordered), np.int64)
    u = -1
    for i in range(len(ordered)):
        if u < 0 or ordered[i] != values[u]:
            u += 1
            values[u] = ordered[i]
        counts[u] += 1
    return values[:u + 1], counts[:u + 1]


@compiled
def best_start(positions, n, period, tol):  # pragma: no cover - compiled
    """:func:`coils.periodic._best_start`: the start index, -1 for none."""
    reach = (FIRST_TURNS + 0.5) * period
    start, most = 0, -1
    for i in range(n):
        count = 0
        j = i + 1
        while j < n and positions[j] <= positions[i] + reach:
            offset = positions[j] - positions[i]
            turn = np.rint(offset / period)
            if turn >= 1 and turn <= FIRST_TURNS and abs(offset - turn * period) <= tol:
                count += 1
            j += 1
        if count > most:
            start, most = i, count
    return start if most >= 2 else -1


@compiled
def nearest_per_turn(after, n, offset, period, limit, tol, turns, chosen, errors):  # pragma: no cover - compiled
    """:func:`coils.periodic._nearest_per_turn` into ``turns`` and ``chosen``; returns how many.

    One pass: with ``period > 0`` the turns of the sorted ``after`` never decrease (each step of
    ``rint((after - offset) / period)`` is monotonic in IEEE arithmetic), so a turn's records are adjacent.
    """
    count = 0
    for i in range(n):
        turn = np.rint((after[i] - offset) / period)
        if turn < 0 or turn > limit:
            continue
        error = abs(after[i] - offset - turn * period)
        if not error <= tol:
            continue
        if count > 0 and turns[count - 1] == turn:
            if error < errors[count - 1]:
                chosen[count - 1], errors[count - 1] = i, error
        else:
            turns[count], chosen[count], errors[count] = turn, i, error
            count += 1
    return count


@compiled(nogil=False)
def walk(positions, n, start, period, tol, min_count, p_hit, lgamma, scratch, hits, turns, memory):  # pragma: no cover
    """:func:`coils.periodic._walk` into ``hits`` and ``turns``: (repeats, log tail probability); 0 repeats for none.

    Returns -1 repeats (and the trials) where ``lgamma`` is too short for the tail.
    """
    after, along, errors = scratch[0], scratch[1], scratch[2]
    m = n - start
    for i in range(m):
        after[i] = positions[start + i] - positions[start]
    chosen = hits
    offset, limit = 0.0, FIRST_TURNS
    while True:
        count = nearest_per_turn(after, m, offset, period, limit, tol, turns, chosen, errors)
        if count >= 2 and turns[0] == 0:
            for i in range(count):
                along[i] = after[chosen[i]]
            period, offset = remembered_fit(turns, along, count, memory)
        if period <= 0 or limit * period > after[m - 1] + tol:
            break
        limit *= 2
    if period <= 0:
        return 0, 0.0
    total = int(floor_divide(after[m - 1] + tol - offset, period))
    count = nearest_per_turn(after, m, offset, period, total, tol, turns, chosen, errors)
    if count < min_count or turns[0] != 0:
        return 0, 0.0
    if total + 2 > len(lgamma):
        return -1, float(total)
    for i in range(count):
        hits[i] = chosen[i] + start
    return count, log_binomial_tail(count - 1, total, p_hit, lgamma)


@compiled(nogil=False)
def best_walk(positions, n, min_count, candidates, tol, min_period, max_period, lgamma, scratch, hits, turns,
              best_hits, best_turns, memory):  # pragma: no cover - compiled
    """:func:`coils.periodic._best_walk` of ``positions[:n]`` into ``best_hits`` and ``best_turns``:
    (repeats, log tail probability), as :func:`walk` returns them."""
    span = positions[n - 1] - positions[0]
    if span <= 0:
        return 0, 0.0
    density = n / max(span, min_period)
    p_hit = 1.0 - math.exp(-2.0 * density * tol)
    best, best_log_p = 0, 0.0
    for period in candidate_periods(positions, n, min_count, candidates, tol, min_period, max_period):
        start = best_start(positions, n, period, tol)
        if start < 0:
            continue
        count, log_p = walk(positions, n, start, period, tol, min_count, p_hit, lgamma, scratch, hits, turns, memory)
        if count < 0:
            return count, log_p
        if count > 0 and (best == 0 or log_p < best_log_p):
            best, best_log_p = count, log_p
            best_hits[:count], best_turns[:count] = hits[:count], turns[:count]
    return best, best_log_p


@compiled(nogil=False)
def search_bands(positions, records, bounds, min_count, candidates, tol, min_period, max_period, log_tests,
                 log_alpha, lgamma):  # pragma: no cover - compiled
    """:func:`coils.periodic._search_band` of every band: band ``b``'s records are ``records[bounds[b]:bounds[b + 1]]``
    (sorted along), their along centres ``positions[...]``.

    Returns:
        (band, log tail probability, first hit) per find, and the finds' records and turns (a find's hits
        run to the next one's first); or a first row (-1, trials, 0) where ``lgamma`` is too short.
    """
    finds = np.empty((len(records) // max(min_count, 1) + 1, 3), np.float64)
    found_records, found_turns = np.empty(len(records), np.int64), np.empty(len(records), np.float64)
    size = 0
    for b in range(len(bounds) - 1):
        size = max(size, bounds[b + 1] - bounds[b])
    scratch, memory = np.empty((3, size), np.float64), fit_memory()
    hits, best_hits = np.empty(size, np.int64), np.empty(size, np.int64)
    turns, best_turns = np.empty(size, np.float64), np.empty(size, np.float64)
    alive, kept = np.empty(size, np.float64), np.empty(size, np.int64)
    nfinds, nhits = 0, 0
    for b in range(len(bounds) - 1):
        n = bounds[b + 1] - bounds[b]
        alive[:n], kept[:n] = positions[bounds[b]:bounds[b + 1]], records[bounds[b]:bounds[b + 1]]
        while n >= min_count:
            count, log_p = best_walk(alive, n, min_count, candidates, tol, min_period, max_period, lgamma, scratch,
                                     hits, turns, best_hits, best_turns, memory)
            if count < 0:
                finds[0, 0], finds[0, 1] = -1, log_p
                return finds[:1], found_records[:0], found_turns[:0]
            if count == 0 or log_p + log_tests >= log_alpha:
                break
            finds[nfinds, 0], finds[nfinds, 1], finds[nfinds, 2] = b, log_p, nhits
            nfinds += 1
            left, h = 0, 0
            for i in range(n):  # the repeats into the find, the rest kept in order
                if h < count and best_hits[h] == i:
                    found_records[nhits], found_turns[nhits] = kept[i], best_turns[h]
                    nhits, h = nhits + 1, h + 1
                else:
                    alive[left], kept[left] = alive[i], kept[i]
                    left += 1
            n = left
    return finds[:nfinds], found_records[:nhits], found_turns[:nhits]
