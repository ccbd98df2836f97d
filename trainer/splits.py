"""Holdout and K-fold splits, stratified on each image's set of defect classes; ``trainer split``.

The holdout (the final test set) is drawn first; the K cross-validation folds share out the rest.
Both use multi-label iterative stratification (Sechidis, Tsoumakas and Vlahavas, "On the
stratification of multi-label data", ECML PKDD 2011): the rarest label still to place goes
first, each of its images to the part that most lacks that label. Two changes to the paper's
algorithm, both so that the split follows the line's data rather than chance:

* part sizes are exact: a part that is full takes no more images (fold sizes differ by at most
  one, the holdout has exactly the size asked for);
* besides the C classes, every pair of classes that occurs together is a label of its own, so
  images with two defect kinds are spread over the folds too (second-order stratification);
* a final pass swaps images between parts while a swap brings the counts closer to their shares,
  which matters for labels most images carry (not Severstal's, but nothing here assumes that).

Defect-free images have no label and fill the remaining places at random. The assignment is
written to ``folds.csv`` (``ImageId,fold,labels``; fold -1 = holdout) so later runs reuse it.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.files import atomic_write
from engine.metadata import class_ids
from trainer.samples import label_matrix

if TYPE_CHECKING:
    from trainer.samples import Sample

log = logging.getLogger(__name__)

#: What ``trainer evaluate --split`` scores: the holdout, every image out of fold, or every image.
SPLITS = ("holdout", "oof", "all")
HOLDOUT = -1
FOLDS_HEADER = ("ImageId", "fold", "labels")



# --------------------------------------------------------------------------- stratification


def _label_columns(labels: np.ndarray) -> np.ndarray:
    """The labels stratified on: one column per class, plus one per co-occurring pair of classes."""
    columns = [labels]
    for a, b in combinations(range(labels.shape[1]), 2):
        pair = labels[:, a] & labels[:, b]
        if pair.any():
            columns.append(pair[:, None])
    return np.concatenate(columns, axis=1)


def _part_sizes(n: int, proportions: Sequence[float]) -> np.ndarray:
    """Integer sizes summing to ``n`` closest to ``n * proportions`` (largest remainder)."""
    p = np.asarray(proportions, dtype=np.float64)
    exact = n * p / p.sum()
    sizes = np.floor(exact).astype(np.int64)
    short = n - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:short]] += 1
    return sizes


def iterative_stratification(
    labels: np.ndarray, sizes: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """Assigns each row of a bool label matrix ``[N, L]`` to one of ``len(sizes)`` parts of the given sizes.

    Returns:
        int64 ``[N]``: the part of each row; part j receives exactly ``sizes[j]`` rows.
    """
    labels = np.asarray(labels, dtype=bool)
    sizes = np.asarray(sizes, dtype=np.int64)
    n = labels.shape[0]
    if sizes.sum() != n or (sizes < 0).any():
        raise ValueError(f"part sizes {sizes.tolist()} must be >= 0 and sum to the {n} images")
    # A label most images carry is balanced through its absence: the few images without it go
    # first, evenly; otherwise they fall wherever room is left and unbalance the label at the end.
    given = labels
    dense = labels.sum(axis=0) * 2 > n
    if dense.any():
        labels = np.concatenate([labels, ~labels[:, dense]], axis=1)
    parts = len(sizes)
    capacity = sizes.copy()
    # Desired count of each label in each part, proportional to the part's size.
    wanted = sizes[:, None] / max(n, 1) * labels.sum(axis=0)[None, :].astype(np.float64)
    assignment = np.full(n, -1, dtype=np.int64)
    remaining = labels.sum(axis=0).astype(np.int64)
    tiebreak = rng.random((n, parts))
    while remaining.any():
        candidates = np.flatnonzero(remaining == remaining[remaining > 0].min())
        label = int(rng.choice(candidates))
        rows = np.flatnonzero(labels[:, label] & (assignment < 0))
        for i in rows[rng.permutation(len(rows))].tolist():
            open_parts = capacity > 0
            # Most wanted for this label, then most room left, then chance.
            order = np.lexsort((tiebreak[i], capacity, wanted[:, label], open_parts))
            part = int(order[-1])
            assignment[i] = part
            capacity[part] -= 1
            wanted[part, labels[i]] -= 1
            remaining[labels[i]] -= 1
    free = np.flatnonzero(assignment < 0)
    assignment[free[rng.permutation(len(free))]] = np.repeat(np.arange(parts), capacity)
    return _refine_by_swaps(given, assignment, sizes, rng)


def _refine_by_swaps(
    labels: np.ndarray, assignment: np.ndarray, sizes: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Swaps images between parts while a swap brings the label counts closer to their shares.

    The greedy pass can leave a frequent, correlated label a few images off its share (its last
    images go wherever room is left). Swapping two images keeps every part's size; each swap is
    the one that most lowers the sum of squared deviations from the shares, found for all pairs of
    parts and label patterns at once. Stops at a local optimum (each swap strictly improves).
    """
    parts = len(sizes)
    if parts < 2 or labels.shape[1] == 0 or len(assignment) == 0:
        return assignment
    patterns, pattern_of = np.unique(labels, axis=0, return_inverse=True)
    pattern_of = pattern_of.reshape(-1)
    x = patterns.astype(np.float64)  # [U, L]
    share = sizes[:, None] / len(assignment) * labels.sum(axis=0)[None, :]  # [P, L]
    members = np.zeros((parts, len(patterns)), dtype=np.int64)  # images of pattern u in part p
    np.add.at(members, (assignment, pattern_of), 1)
    step = x[None, :, :] - x[:, None, :]  # [U(out), U(in), L]: change to the receiving part
    step_norm = (step**2).sum(axis=-1)
    for _ in range(len(assignment)):
        deviation = members.astype(np.float64) @ x - share  # [P, L]
        gap = deviation[:, None, :] - deviation[None, :, :]  # [P, Q, L]
        # Pattern u leaves part p for part q, pattern v leaves q for p: p changes by x[v] - x[u].
        gain = 2.0 * np.einsum("pql,uvl->pquv", gap, step) + 2.0 * step_norm[None, None]
        valid = (members[:, None, :, None] > 0) & (members[None, :, None, :] > 0)
        valid &= ~np.eye(parts, dtype=bool)[:, :, None, None]
        gain = np.where(valid, gain, np.inf)
        best = np.unravel_index(int(np.argmin(gain)), gain.shape)
        if not gain[best] < -1e-9:
            break
        p, q, u, v = (int(i) for i in best)
        a = rng.choice(np.flatnonzero((assignment == p) & (pattern_of == u)))
        b = rng.choice(np.flatnonzero((assignment == q) & (pattern_of == v)))
        assignment[a], assignment[b] = q, p
        members[p, u] -= 1
        members[q, u] += 1
        members[q, v] -= 1
        members[p, v] += 1
    return assignment


def make_folds(
    samples: Sequence[Sample], num_classes: int, folds: int = 5, holdout: float | int = 0.1, seed: int = 0
) -> dict[str, int]:
    """Stratified holdout, then ``folds`` stratified folds over the rest.

    Args:
        samples: the images (order does not matter: they are sorted by image id first).
        num_classes: C.
        folds: K >= 2.
        holdout: a float in [0, 1) is a fraction of the images, an int >= 0 a count.
        seed: makes the split deterministic.

    Returns:
        image id -> fold index ``0..folds-1``, or :data:`HOLDOUT` (-1).
    """
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    ordered = sorted(samples, key=lambda s: s.image_id)
    ids = [s.image_id for s in ordered]
    if len(set(ids)) != len(ids):
        dup = next(i for i, j in zip(ids, ids[1:]) if i == j)
        raise ValueError(f"image {dup} appears twice in the samples")
    n = len(ordered)
    n_holdout = holdout_count(holdout, n)
    if n - n_holdout < folds:
        raise ValueError(
            f"{n} images with a holdout of {n_holdout} leave {n - n_holdout} for {folds} folds; "
            f"need at least one image per fold"
        )
    labels = _label_columns(label_matrix(ordered, num_classes))
    rng = np.random.default_rng(seed)
    result = np.full(n, HOLDOUT, dtype=np.int64)
    rest = np.arange(n)
    if n_holdout:
        part = iterative_stratification(labels, [n_holdout, n - n_holdout], rng)
        rest = np.flatnonzero(part == 1)
    sizes = _part_sizes(len(rest), [1.0] * folds)
    result[rest] = iterative_stratification(labels[rest], sizes, rng)
    return dict(zip(ids, result.tolist()))


def holdout_count(holdout: float | int, n: int) -> int:
    """Images in the holdout: a float in [0, 1) is a fraction of ``n``, an int >= 0 a count."""
    if isinstance(holdout, bool):
        raise ValueError(f"holdout must be a fraction in [0, 1) or a count >= 0, got {holdout!r}")
    if isinstance(holdout, (int, np.integer)):
        if not 0 <= holdout < n:
            raise ValueError(f"holdout count must be in 0..{n - 1} for {n} images, got {holdout}")
        return int(holdout)
    if not 0.0 <= float(holdout) < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {holdout}")
    return int(round(float(holdout) * n))


# --------------------------------------------------------------------------- folds.csv


def write_folds(path: Path, assignment: dict[str, int], samples: Sequence[Sample]) -> None:
    """Writes ``folds.csv``: ``ImageId,fold,labels`` (labels: the image's class ids, space-separated)."""
    path = Path(path)
    by_id = {s.image_id: s for s in samples}
    missing = [i for i in assignment if i not in by_id]
    if missing:
        raise ValueError(f"assignment names {len(missing)} images not in the samples, e.g. {missing[0]}")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(FOLDS_HEADER)
    for image_id in sorted(assignment):
        writer.writerow([image_id, assignment[image_id], " ".join(map(str, by_id[image_id].labels))])
    atomic_write(path, text.getvalue(), make_parents=True)


def _read_folds_rows(path: Path) -> dict[str, tuple[int, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"folds file {path} does not exist")
    out: dict[str, tuple[int, str]] = {}
    lines: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != FOLDS_HEADER:
            raise ValueError(f"{path}:1: expected the header {','.join(FOLDS_HEADER)}, got {header!r}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(FOLDS_HEADER):
                raise ValueError(f"{where}: expected 3 fields (ImageId,fold,labels), got {len(row)}")
            image_id = row[0].strip()
            try:
                fold = int(row[1])
            except ValueError:
                raise ValueError(f"{where}: fold {row[1]!r} is not an integer") from None
            if fold < HOLDOUT:
                raise ValueError(f"{where}: fold {fold} is invalid: expected {HOLDOUT} (holdout) or 0..K-1")
            if image_id in out:
                raise ValueError(f"{where}: image {image_id} listed twice (first at line {lines[image_id]})")
            out[image_id] = (fold, row[2].strip())
            lines[image_id] = reader.line_num
    return out


def read_folds(path: Path) -> dict[str, int]:
    """Reads ``folds.csv`` into image id -> fold (or :data:`HOLDOUT`)."""
    return {k: v[0] for k, v in _read_folds_rows(path).items()}


def load_or_make_folds(
    path: Path,
    samples: Sequence[Sample],
    num_classes: int,
    folds: int = 5,
    holdout: float | int = 0.1,
    seed: int = 0,
) -> dict[str, int]:
    """Reuses ``path`` if it exists (checked against the data), else makes the split and writes it.

    Raises:
        ValueError: the existing file names images not in the data, misses images of the data,
            or has a different number of folds.
    """
    path = Path(path)
    if not path.exists():
        assignment = make_folds(samples, num_classes, folds=folds, holdout=holdout, seed=seed)
        write_folds(path, assignment, samples)
        log.info("wrote %s (%d folds, seed %d)", path, folds, seed)
        return assignment
    rows = _read_folds_rows(path)
    data_ids = {s.image_id for s in samples}
    unknown = sorted(set(rows) - data_ids)
    if unknown:
        raise ValueError(
            f"{path} names {len(unknown)} images that are not in the data, e.g. {', '.join(unknown[:3])}; "
            f"delete it to make new folds"
        )
    absent = sorted(data_ids - set(rows))
    if absent:
        raise ValueError(
            f"{len(absent)} images of the data are not in {path}, e.g. {', '.join(absent[:3])}; "
            f"delete it to make new folds"
        )
    found = sorted({f for f, _ in rows.values() if f != HOLDOUT})
    if found != list(range(folds)):
        raise ValueError(
            f"{path} has folds {found}, expected {folds} folds 0..{folds - 1}; "
            f"delete it or pass the matching fold count"
        )
    changed = [s.image_id for s in samples if rows[s.image_id][1] != " ".join(map(str, s.labels))]
    if changed:
        log.warning(
            "%s: %d images' labels changed since the folds were made (e.g. %s); "
            "the split is no longer stratified on the current labels",
            path,
            len(changed),
            changed[0],
        )
    n_holdout = sum(1 for f, _ in rows.values() if f == HOLDOUT)
    if n_holdout != holdout_count(holdout, len(samples)):
        log.warning(
            "%s has %d holdout images; reusing it rather than the holdout asked for (%s)",
            path,
            n_holdout,
            holdout,
        )
    log.info("reusing %s (%d folds, %d holdout images)", path, folds, n_holdout)
    return {k: v[0] for k, v in rows.items()}


# --------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class FoldCounts:
    """Images per part of a split, and how many hold each class.

    Attributes:
        folds: the parts, ``0..K-1`` then :data:`HOLDOUT` when there is one.
        images: images per part ``[F]``.
        defect_free: images without any defect ``[F]``.
        multi: images with two or more classes ``[F]``.
        classes: images holding class k+1 ``[F, C]``.
    """

    folds: tuple[int, ...]
    images: np.ndarray
    defect_free: np.ndarray
    multi: np.ndarray
    classes: np.ndarray

    def format(self, class_names: Sequence[str] | None = None) -> str:
        """A text table, one row per part plus a total row."""
        c = self.classes.shape[1]
        names = [f"{k}:{class_names[k - 1]}" if class_names else f"class {k}" for k in class_ids(c)]
        header = ["fold", "images", "defect-free", "multi", *names]
        rows = []
        for j, fold in enumerate(self.folds):
            rows.append(
                [
                    "holdout" if fold == HOLDOUT else str(fold),
                    self.images[j],
                    self.defect_free[j],
                    self.multi[j],
                ]
                + self.classes[j].tolist()
            )
        rows.append(
            ["total", self.images.sum(), self.defect_free.sum(), self.multi.sum()]
            + self.classes.sum(0).tolist()
        )
        table = [header] + [[str(v) for v in r] for r in rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in table)


def fold_class_counts(assignment: dict[str, int], samples: Sequence[Sample], num_classes: int) -> FoldCounts:
    """Per fold (and holdout): images, defect-free images, multi-class images, images per class."""
    ordered = [s for s in samples if s.image_id in assignment]
    if len(ordered) != len(assignment):
        raise ValueError("the assignment names images that are not in the samples")
    labels = label_matrix(ordered, num_classes)
    fold_of = np.array([assignment[s.image_id] for s in ordered], dtype=np.int64)
    parts = sorted(set(fold_of.tolist()) - {HOLDOUT}) + ([HOLDOUT] if (fold_of == HOLDOUT).any() else [])
    member = fold_of[None, :] == np.array(parts)[:, None]  # [F, N]
    per_image = labels.sum(axis=1)
    return FoldCounts(
        folds=tuple(parts),
        images=member.sum(axis=1),
        defect_free=(member & (per_image == 0)).sum(axis=1),
        multi=(member & (per_image >= 2)).sum(axis=1),
        classes=member.astype(np.int64) @ labels.astype(np.int64),
    )


# --------------------------------------------------------------------------- CLI


def parse_holdout(text: str) -> float | int:
    """``"0.1"`` -> 0.1 (fraction), ``"250"`` -> 250 (count)."""
    try:
        value: float | int = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a fraction such as 0.1 or a count such as 250, got {text!r}"
            ) from None
    if (isinstance(value, int) and value < 0) or (isinstance(value, float) and not 0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a count >= 0, got {text!r}")
    return value


