"""Periodic defects (roll marks): the same defect repeating at a constant period along the strip.

A damaged roll prints one mark per turn: the same class at the same lateral place, every
circumference (π x diameter) along the strip. :func:`find_periodic` looks for that in a coil's
defect records:

1. Per class, the records are put into lateral bands by their across centre (bands of
   ``band_mm``, overlapping by half, so a mark on a band's edge still lies inside one).
2. In a band, the histogram of pairwise along distances (centre to centre, up to the longest period
   looked for: twice the largest roll's circumference) peaks at the period and its multiples; its
   highest bins are the candidate periods.
3. Each candidate is walked from the record followed by the most records at whole periods over its
   first turns: the record nearest each expected place within ``tolerance_mm`` is a repeat (a
   missed turn skips on), in stages of 8, 16, 32, ... turns with the period and phase refitted to the
   repeats after each (least squares on the turn numbers), so that it does not drift off the marks.
4. Significance: under random defects of the band's own density ``λ`` a given expected place
   holds one with probability ``p = 1 - exp(-2 λ tol)``, so the hits of ``K`` expected places are
   Binomial(K, p). The tail probability, multiplied by the number of walks tried over the whole
   coil (Bonferroni), must be below ``alpha``; the confidence is one minus that product. Dense
   random defects make ``p`` large and the hits they give unremarkable, so they find nothing.

The period is matched to the line's rolls: within ``roll_tolerance`` (1 %) of a roll's
circumference names that roll.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

import numpy as np

from coils.line import Line
from coils.records import DefectRecord
from engine.kernels import import_kernel

log = logging.getLogger(__name__)

#: Turns over which a candidate period picks its walk's starting record.
FIRST_TURNS = 8


@dataclass(frozen=True)
class PeriodicConfig:
    """How :func:`find_periodic` searches.

    Attributes:
        band_mm: width of a lateral band.
        tolerance_mm: how far from its expected place a repeat may lie along.
        min_count: fewest repeats that make a periodic defect.
        min_period_mm: shortest period looked for.
        alpha: the largest chance, over the whole coil, of a random background giving a find.
        roll_tolerance: relative distance of the period to a roll's circumference that names the roll.
        candidates: histogram peaks checked per band.
        max_period_mm: longest period looked for; None: twice the line's largest roll circumference, or
            10 m for a line without rolls (pairs further apart are never compared: the search stays
            near-linear in the records however long the coil).
    """

    band_mm: float = 20.0
    tolerance_mm: float = 3.0
    min_count: int = 4
    min_period_mm: float = 50.0
    alpha: float = 1e-4
    roll_tolerance: float = 0.01
    candidates: int = 4
    max_period_mm: float | None = None  # None: twice the line's largest roll circumference (10 m without rolls)


@dataclass(frozen=True)
class PeriodicDefect:
    """One repeating defect.

    Attributes:
        class_id: the records' class.
        across_start_mm, across_end_mm: the lateral extent of its repeats.
        period_mm: the fitted period along the strip.
        confidence: one minus the chance that random defects give as many repeats (whole coil).
        first_mm, last_mm: along centre of the first and the last repeat.
        count: repeats found.
        roll: the line's roll whose circumference matches; "" for none.
        records: the repeats' indices in the records searched, along the strip.
    """

    class_id: int
    across_start_mm: float
    across_end_mm: float
    period_mm: float
    confidence: float
    first_mm: float
    last_mm: float
    count: int
    roll: str
    records: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["records"] = list(self.records)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeriodicDefect:
        """What :meth:`to_dict` wrote; KeyError naming a missing or unknown key."""
        names = [f.name for f in fields(cls)]
        if sorted(data) != sorted(names):
            raise KeyError(f"periodic defect: expected keys {sorted(names)}, got {sorted(data)}")
        return cls(int(data["class_id"]), float(data["across_start_mm"]), float(data["across_end_mm"]),
                   float(data["period_mm"]), float(data["confidence"]), float(data["first_mm"]),
                   float(data["last_mm"]), int(data["count"]), str(data["roll"]),
                   tuple(int(i) for i in data["records"]))


@dataclass(frozen=True)
class _Walk:
    hits: tuple[int, ...]  # indices into the band's sorted positions
    turns: tuple[int, ...]
    expected: int
    log_p: float  # log of the binomial tail probability


@dataclass(frozen=True)
class _Find:
    band: int  # its place in the bands searched
    log_p: float  # the walk's log tail probability
    records: list[int]  # the repeats' record indices, along the strip
    turns: np.ndarray  # the repeats' turn numbers (floats)


def find_periodic(line: Line, records: Sequence[DefectRecord], config: PeriodicConfig | None = None,
                  only: Collection[tuple[int, int]] | None = None, compiled: bool = True) -> list[PeriodicDefect]:
    """The periodic defects among ``records`` (one coil's), most repeats first (see the module's doc).

    Args:
        only: search just these (class, band) keys (:func:`band_keys`), e.g. the bands a live view's
            new records fell in; the significance still counts the walks of every band.
        compiled: False searches with numpy even where numba is installed (the tests compare the two;
            they give the same finds to the last bit).
    """
    config = config or PeriodicConfig()
    centres = np.array([_along(r) for r in records], np.float64)
    bands = _bands(records, config)
    tests = max(1, sum(len(b) * config.candidates for b in bands.values()))
    searched = [(key, members) for key, members in bands.items() if only is None or key in only]
    kernel = _kernel() if compiled else None
    search = _search_compiled if kernel is not None else _search_numpy
    found = [(f.log_p, _defect(line, records, searched[f.band][0][0], f, tests, centres, config))
             for f in search(centres, [members for _, members in searched], tests, config, max_period_mm(line, config))]
    kept: list[PeriodicDefect] = []
    taken: set[int] = set()
    for _, defect in sorted(found, key=lambda f: (f[0], -f[1].count)):
        if len(taken.intersection(defect.records)) * 2 > defect.count:
            continue  # the same repeat seen from the overlapping band
        kept.append(defect)
        taken.update(defect.records)
    return sorted(kept, key=lambda d: (-d.count, d.class_id, d.first_mm))


def _bands(records: Sequence[DefectRecord], config: PeriodicConfig) -> dict[tuple[int, int], np.ndarray]:
    """Record indices (ascending) per (class, band number), the bands in the order their first record comes;
    band ``b`` covers ``[b, b + 2) * band_mm / 2``. In numpy: a dense coil's window has tens of thousands."""
    if not records:
        return {}
    classes = np.array([r.class_id for r in records], np.int64)
    across = np.array([(r.across_start_mm + r.across_end_mm) / 2 / (config.band_mm / 2) for r in records])
    band = np.floor(across).astype(np.int64)  # band_keys' number, the same floats
    low, width = int(band.min()) - 1, int(band.max()) - int(band.min()) + 2
    code = classes * width + (band - low)  # (class, band) as one integer; the record's second band is code - 1
    codes = np.stack([code, code - 1], 1).reshape(-1)
    order = np.argsort(codes, kind="stable")  # by band, each band's records ascending
    ordered = codes[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    ends, members = np.append(starts[1:], len(codes)), order // 2
    unique, first = ordered[starts].tolist(), order[starts]  # a band's first place in ``codes``: its first record
    return {(unique[u] // width, unique[u] % width + low): members[starts[u]:ends[u]]
            for u in np.argsort(first, kind="stable").tolist() if ends[u] - starts[u] >= config.min_count}


def band_keys(record: DefectRecord, config: PeriodicConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two (class, band number) keys of the overlapping lateral bands ``record``'s across centre lies in."""
    b = math.floor((record.across_start_mm + record.across_end_mm) / 2 / (config.band_mm / 2))
    return (record.class_id, b), (record.class_id, b - 1)


def _search_numpy(centres: np.ndarray, bands: list[np.ndarray], tests: int, config: PeriodicConfig,
                  max_period: float) -> list[_Find]:
    """The finds of every band, band by band in numpy."""
    return [find for band, members in enumerate(bands)
            for find in _search_band(centres, band, members, tests, config, max_period)]


def _search_band(centres: np.ndarray, band: int, members: np.ndarray, tests: int, config: PeriodicConfig,
                 max_period: float) -> list[_Find]:
    """Periodic defects in one band: the best walk, its repeats taken out, again, while significant."""
    order = members[np.argsort(centres[members], kind="stable")]  # along, ties in record order
    found: list[_Find] = []
    while len(order) >= config.min_count:
        positions = centres[order]
        best = _best_walk(positions, config, max_period)
        if best is None or best.log_p + math.log(tests) >= math.log(config.alpha):
            break
        found.append(_Find(band, best.log_p, order[list(best.hits)].tolist(), np.array(best.turns, np.float64)))
        order = np.delete(order, list(best.hits))
    return found


def _search_compiled(centres: np.ndarray, bands: list[np.ndarray], tests: int, config: PeriodicConfig,
                     max_period: float) -> list[_Find]:
    """The finds of every band in one call of :func:`coils.periodic_kernel.search_bands`."""
    kernel = _kernel()
    assert kernel is not None
    members = np.concatenate(bands) if bands else np.empty(0, np.int64)
    band = np.repeat(np.arange(len(bands)), [len(m) for m in bands])
    order = np.argsort(centres[members], kind="stable")
    order = order[np.argsort(band[order], kind="stable")]  # by band, then along, ties in record order
    records = members[order]
    bounds = np.concatenate([[0], np.cumsum([len(m) for m in bands])]).astype(np.int64)
    while True:
        finds, found_records, found_turns = kernel.search_bands(
            centres[records], records, bounds, int(config.min_count), int(config.candidates),
            float(config.tolerance_mm), float(config.min_period_mm), float(max_period), math.log(tests),
            math.log(config.alpha), _lgamma_table(0))
        if len(finds) == 0 or finds[0, 0] >= 0:
            break
        _lgamma_table(int(finds[0, 1]) + 2)  # a walk of more turns than the table held: again with room
    found_turns = found_turns + 0.0  # rint's -0.0 as the numpy path's int turns give it: lstsq tells them apart
    ends = [*finds[1:, 2].astype(np.int64).tolist(), len(found_records)]
    return [_Find(int(b), float(log_p), found_records[int(first):end].tolist(), found_turns[int(first):end])
            for (b, log_p, first), end in zip(finds.tolist(), ends)]


def _best_walk(positions: np.ndarray, config: PeriodicConfig, max_period_mm: float) -> _Walk | None:
    """The walk of least tail probability over the band's candidate periods (each from its best start)."""
    span = float(positions[-1] - positions[0])
    if span <= 0:
        return None
    density = len(positions) / max(span, config.min_period_mm)
    p_hit = 1.0 - math.exp(-2.0 * density * config.tolerance_mm)
    best: _Walk | None = None
    periods = _candidate_periods(positions, config, max_period_mm)
    # the pairs of the longest candidate's first turns once; each candidate takes those within its own
    pairs = _pairs_within(positions, (FIRST_TURNS + 0.5) * max(periods)) if periods else None
    for period in periods:
        start = _best_start(positions, pairs, period, config)
        walk = None if start is None else _walk(positions, start, period, p_hit, config)
        if walk is not None and (best is None or walk.log_p < best.log_p):
            best = walk
    return best


def _best_start(positions: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], period: float,
                config: PeriodicConfig) -> int | None:
    """The record followed by the most records at whole periods within :data:`FIRST_TURNS` turns.

    Only the first turns, where the candidate period's error has not yet added up; the walk from
    the start chosen then re-anchors at every repeat it takes. ``pairs``: :func:`_pairs_within` of a
    reach at least this period's first turns'.
    """
    first, then = pairs
    within = positions[then] <= positions[first] + (FIRST_TURNS + 0.5) * period  # _pairs_within's own test
    first, then = first[within], then[within]
    offsets = positions[then] - positions[first]
    turns = np.rint(offsets / period)
    near = (turns >= 1) & (turns <= FIRST_TURNS) & (np.abs(offsets - turns * period) <= config.tolerance_mm)
    counts = np.bincount(first[near], minlength=len(positions))
    start = int(np.argmax(counts))
    return start if counts[start] >= 2 else None


def _pairs_within(positions: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, of the sorted ``positions`` at most ``reach`` apart (no n x n matrix)."""
    n = len(positions)
    counts = np.searchsorted(positions, positions + reach, side="right") - np.arange(n) - 1
    first = np.repeat(np.arange(n), counts)
    then = first + 1 + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return first, then


def _candidate_periods(positions: np.ndarray, config: PeriodicConfig, max_period_mm: float) -> list[float]:
    """The mean pairwise distance in the highest bins of the distance histogram (bins of the tolerance)."""
    span = float(positions[-1] - positions[0])
    longest = min(span / (config.min_count - 1), max_period_mm)
    first, then = _pairs_within(positions, longest + config.tolerance_mm)
    diffs = positions[then] - positions[first]
    diffs = diffs[diffs >= config.min_period_mm]
    if diffs.size == 0:
        return []
    bins = np.floor(diffs / config.tolerance_mm).astype(np.int64)
    values, counts = np.unique(bins, return_counts=True)
    # a peak split over two bins counts both
    pair = counts + np.concatenate([counts[1:] * (np.diff(values) == 1), [0]])
    top = np.argsort(-pair, kind="stable")[:config.candidates]
    periods = []
    for t in top:
        if pair[t] < config.min_count - 1:
            continue
        near = diffs[(bins == values[t]) | (bins == values[t] + 1)]
        periods.append(float(near.mean()))
    return periods


def _walk(positions: np.ndarray, start: int, period: float, p_hit: float, config: PeriodicConfig) -> _Walk | None:
    """Repeats every ``period`` from ``positions[start]``: the record nearest each expected place, within tolerance.

    The turns are taken in stages (8, 16, 32, ... turns), the line ``phase + period x turn`` refitted to
    the repeats after each, so that a candidate period a little off does not drift away from the marks
    over a long coil; each stage is one vectorised pass over the band.
    """
    after, tol = positions[start:] - positions[start], config.tolerance_mm
    offset, limit = 0.0, FIRST_TURNS
    while True:
        turns, chosen = _nearest_per_turn(after, offset, period, limit, tol)
        if len(turns) >= 2 and turns[0] == 0:
            period, offset = (float(v) for v in _fit_line(turns, after[chosen]))
        if period <= 0 or limit * period > after[-1] + tol:
            break
        limit *= 2
    if period <= 0:
        return None
    total = int((after[-1] + tol - offset) // period)
    turns, chosen = _nearest_per_turn(after, offset, period, total, tol)
    if len(turns) < config.min_count or turns[0] != 0:
        return None
    hits = tuple(int(c) + start for c in chosen)
    return _Walk(hits, tuple(int(t) for t in turns), total, _log_binomial_tail(len(hits) - 1, total, p_hit))


def _nearest_per_turn(after: np.ndarray, offset: float, period: float, limit: float,
                      tol: float) -> tuple[np.ndarray, np.ndarray]:
    """(turns, record indices): per turn up to ``limit``, the record nearest its expected place within ``tol``."""
    turn = np.rint((after - offset) / period)
    error = np.abs(after - offset - turn * period)
    index = np.flatnonzero((turn >= 0) & (turn <= limit) & (error <= tol))
    order = index[np.lexsort((error[index], turn[index]))]
    turns = turn[order]
    first = np.ones(len(order), bool)
    np.not_equal(turns[1:], turns[:-1], out=first[1:])
    return turns[first], order[first]


def _fit_line(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``np.polyfit(x, y, 1)`` (slope, intercept), its very steps and floats without its checks: the walks fit
    tens of thousands of lines per search of a dense coil, and polyfit's and lstsq's own overhead was most of it.

    The least squares is the gufunc ``np.linalg.lstsq`` calls (numpy 2), called as it calls it; a result that is
    not finite (lstsq raises where the SVD fails) and an older numpy take ``np.linalg.lstsq`` itself.
    """
    x = np.asarray(x, np.float64)
    lhs = np.empty((len(x), 2))
    lhs[:, 0], lhs[:, 1] = x, 1.0  # np.vander(x, 2)
    scale = np.sqrt((lhs * lhs).sum(axis=0))
    lhs /= scale
    y, rcond = np.asarray(y, np.float64), len(x) * _EPS
    if _LSTSQ is not None:
        with np.errstate(invalid="ignore"):  # a failed SVD: lstsq below raises its error
            solution = _LSTSQ(lhs, y[:, np.newaxis], rcond, signature="ddd->ddid")[0][:, 0]
        if math.isfinite(solution[0]) and math.isfinite(solution[1]):
            return solution / scale
    return np.linalg.lstsq(lhs, y, rcond)[0] / scale


_EPS = float(np.finfo(np.float64).eps)
try:
    from numpy.linalg._umath_linalg import lstsq as _LSTSQ  # numpy >= 2: the one least-squares gufunc
except ImportError:  # numpy 1.x: lstsq_m and lstsq_n, chosen by shape
    _LSTSQ = None


def _log_binomial_tail(hits: int, trials: int, p: float) -> float:
    """log P[Binomial(trials, p) >= hits]."""
    if hits <= 0:
        return 0.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * log_p
             + (trials - k) * log_q for k in range(hits, trials + 1)]
    peak = max(terms)
    total = 0.0
    for term in terms:  # in order, as the compiled kernel adds them (sum() compensates from Python 3.12)
        total += math.exp(term - peak)
    return peak + math.log(total)


def _lgamma_table(size: int) -> np.ndarray:
    """``math.lgamma(k)`` at ``k`` = 0 (NaN), 1, ... up to at least ``size`` - 1, for the compiled tail
    (CPython's lgamma, not the C library's the kernel would call)."""
    global _LGAMMA
    if len(_LGAMMA) < size:
        size = max(size, 2 * len(_LGAMMA))
        _LGAMMA = np.array([math.nan] + [math.lgamma(k) for k in range(1, size)], np.float64)
    return _LGAMMA


_LGAMMA = np.empty(0)
_lgamma_table(4096)


@functools.lru_cache(maxsize=1)
def _kernel() -> ModuleType | None:
    """:mod:`coils.periodic_kernel`, or None where numba is not installed (the search runs in numpy)."""
    module, why_not = import_kernel("coils.periodic_kernel")
    if module is None:
        log.info("periodic defects searched in numpy: %s", why_not)
    return module


def warm_up() -> None:
    """Compiles the search now: seconds where numba's disk cache is cold, better at start than on a coil."""
    line = Line("warm-up", 1000.0, (), ())
    records = [DefectRecord("warm-up", 1, a, a + 1.0, 10.0, 11.0, 1.0, None, (), ()) for a in range(0, 2000, 100)]
    find_periodic(line, records)


def _defect(line: Line, records: Sequence[DefectRecord], class_id: int, find: _Find, tests: int,
            centres: np.ndarray, config: PeriodicConfig) -> PeriodicDefect:
    indices = find.records
    along = centres[indices]
    period = float(_fit_line(find.turns, along)[0])
    chance = math.exp(find.log_p) * tests
    return PeriodicDefect(
        class_id=class_id, across_start_mm=min(records[i].across_start_mm for i in indices),
        across_end_mm=max(records[i].across_end_mm for i in indices), period_mm=period,
        confidence=max(0.0, 1.0 - chance), first_mm=float(along[0]), last_mm=float(along[-1]),
        count=len(indices), roll=match_roll(line, period, config.roll_tolerance), records=tuple(indices))


def max_period_mm(line: Line, config: PeriodicConfig) -> float:
    """The longest period :func:`find_periodic` looks for (see :class:`PeriodicConfig`)."""
    if config.max_period_mm is not None:
        return config.max_period_mm
    return 2 * max((r.circumference_mm for r in line.rolls), default=5000.0)


def match_roll(line: Line, period_mm: float, tolerance: float = 0.01) -> str:
    """The name of the roll whose circumference is nearest ``period_mm`` within ``tolerance`` (relative); "" for none."""
    best, name = tolerance, ""
    for roll in line.rolls:
        off = abs(period_mm - roll.circumference_mm) / roll.circumference_mm
        if off <= best:
            best, name = off, roll.name
    return name


def _along(record: DefectRecord) -> float:
    return (record.along_start_mm + record.along_end_mm) / 2


__all__ = ["PeriodicConfig", "PeriodicDefect", "band_keys", "find_periodic", "match_roll"]
