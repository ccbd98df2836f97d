"""Stratified holdout and K folds, folds.csv, and ``trainer split``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.cli import main as trainer_main
from trainer.data import DataConfig, load_samples
from trainer.samples import Sample, label_matrix
from trainer.splits import (
    HOLDOUT,
    fold_class_counts,
    iterative_stratification,
    load_or_make_folds,
    make_folds,
    read_folds,
    write_folds,
)


@pytest.fixture(scope="module")
def samples(synth_dir: Path, synth_cfg: DataConfig) -> list[Sample]:
    return load_samples(synth_dir, synth_cfg)


def _fake_samples(labels: np.ndarray) -> list[Sample]:
    return [
        Sample(f"{i:05d}.jpg", Path(f"{i:05d}.jpg"), tuple("1 1" if v else "" for v in row), Path("."))
        for i, row in enumerate(labels)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_are_disjoint_cover_the_rest_and_keep_class_proportions(
    samples: list[Sample], seed: int
) -> None:
    """Tolerance: every fold's count of each class is within ONE image of its exact share (total / K),
    and so is the holdout's; iterative stratification places each rare-label image where that label
    is most lacking, so no part can drift further than one image from its share on this data."""
    assignment = make_folds(samples, 4, folds=5, holdout=0.1, seed=seed)
    ids = [s.image_id for s in samples]
    assert sorted(assignment) == sorted(ids)  # every image gets exactly one part: parts are disjoint
    fold = np.array([assignment[i] for i in ids])
    assert set(fold.tolist()) == {HOLDOUT, 0, 1, 2, 3, 4}
    holdout = fold == HOLDOUT
    assert holdout.sum() == round(0.1 * len(samples))
    sizes = np.bincount(fold[~holdout], minlength=5)
    assert sizes.sum() == (~holdout).sum() and sizes.max() - sizes.min() <= 1  # cover every non-holdout image
    labels = label_matrix(samples, 4)
    rest_total = labels[~holdout].sum(axis=0)
    for k in range(5):
        np.testing.assert_array_less(np.abs(labels[fold == k].sum(axis=0) - rest_total / 5), 1.0 + 1e-9)
    share = labels.sum(axis=0) * holdout.sum() / len(samples)
    np.testing.assert_array_less(np.abs(labels[holdout].sum(axis=0) - share), 1.0 + 1e-9)


def test_multi_class_images_are_spread(samples: list[Sample]) -> None:
    assignment = make_folds(samples, 4, folds=2, holdout=0, seed=0)
    multi = [assignment[s.image_id] for s in samples if len(s.labels) >= 2]
    assert len(multi) == 2 and sorted(multi) == [0, 1]


def test_split_is_deterministic_by_seed_and_input_order(samples: list[Sample]) -> None:
    a = make_folds(samples, 4, seed=3)
    assert make_folds(list(reversed(samples)), 4, seed=3) == a
    assert make_folds(samples, 4, seed=4) != a


def test_holdout_count_and_no_holdout(samples: list[Sample]) -> None:
    counted = make_folds(samples, 4, folds=3, holdout=7)
    assert sum(f == HOLDOUT for f in counted.values()) == 7
    none = make_folds(samples, 4, folds=3, holdout=0)
    assert HOLDOUT not in none.values()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"folds": 1}, "folds must be an integer >= 2"),
        ({"holdout": 1.0}, r"holdout fraction must be in \[0, 1\)"),
        ({"holdout": -0.1}, r"holdout fraction must be in \[0, 1\)"),
        ({"holdout": 48}, r"holdout count must be in 0\.\.47 for 48 images"),
        ({"holdout": 45, "folds": 5}, "leave 3 for 5 folds"),
    ],
)
def test_bad_split_arguments(samples: list[Sample], kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_folds(samples, 4, **kwargs)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=120),
    parts=st.integers(min_value=1, max_value=6),
    rates=st.lists(st.floats(min_value=0.0, max_value=0.8), min_size=1, max_size=5),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_iterative_stratification_exact_sizes_and_near_shares(
    n: int, parts: int, rates: list[float], seed: int
) -> None:
    """Part sizes are exact, and each part's count of each label stays within 2 images of its share.

    Tolerance: exact shares are fractional and parts have fixed sizes, so a count can be off by more
    than one image on tiny or dense inputs; over 20,000 random matrices like these (up to 120 rows,
    6 parts, 5 labels at up to 80 % density) the worst deviation measured was 1.17 images.
    """
    rng = np.random.default_rng(seed)
    labels = rng.random((n, len(rates))) < np.array(rates)
    sizes = np.full(parts, n // parts)
    sizes[: n % parts] += 1
    assignment = iterative_stratification(labels, sizes, np.random.default_rng(seed))
    np.testing.assert_array_equal(np.bincount(assignment, minlength=parts), sizes)
    for j in range(parts):
        share = labels.sum(axis=0) * sizes[j] / n
        assert np.all(np.abs(labels[assignment == j].sum(axis=0) - share) <= 2.0)


def test_folds_file_round_trip_and_counts(tmp_path: Path, samples: list[Sample]) -> None:
    assignment = make_folds(samples, 4)
    path = tmp_path / "folds.csv"
    write_folds(path, assignment, samples)
    assert read_folds(path) == assignment
    lines = path.read_text().splitlines()
    assert lines[0] == "ImageId,fold,labels"
    multi = next(s for s in samples if len(s.labels) == 2)
    assert f"{multi.image_id},{assignment[multi.image_id]},{multi.labels[0]} {multi.labels[1]}" in lines
    counts = fold_class_counts(assignment, samples, 4)
    assert counts.folds == (0, 1, 2, 3, 4, HOLDOUT)
    assert counts.images.sum() == 48 and counts.classes.sum(axis=0).tolist() == [6, 3, 15, 5]
    assert counts.multi.sum() == 2 and counts.defect_free.sum() == 48 - sum(1 for s in samples if s.labels)
    table = counts.format(DataConfig().class_names)
    assert (
        "holdout" in table
        and "1:pits/dents" in table
        and table.splitlines()[-1].split()[:2] == ["total", "48"]
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Image,fold\n", r"folds\.csv:1: expected the header ImageId,fold,labels"),
        ("ImageId,fold,labels\na.jpg,x,\n", r"folds\.csv:2: fold 'x' is not an integer"),
        ("ImageId,fold,labels\na.jpg,-2,\n", r"folds\.csv:2: fold -2 is invalid"),
        ("ImageId,fold,labels\na.jpg,0,\na.jpg,1,\n", r"folds\.csv:3: image a\.jpg listed twice"),
        ("ImageId,fold,labels\na.jpg,0\n", r"folds\.csv:2: expected 3 fields"),
    ],
)
def test_bad_folds_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "folds.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_folds(path)


def test_load_or_make_folds_reuses_and_checks(tmp_path: Path, samples: list[Sample]) -> None:
    path = tmp_path / "folds.csv"
    made = load_or_make_folds(path, samples, 4, folds=5, holdout=0.1, seed=0)
    assert path.exists() and made == make_folds(samples, 4, folds=5, holdout=0.1, seed=0)
    # A file from an earlier run is reused as it is, even when a new split would differ.
    other = make_folds(samples, 4, folds=5, holdout=0.1, seed=9)
    write_folds(path, other, samples)
    assert load_or_make_folds(path, samples, 4, folds=5, holdout=0.1, seed=0) == other
    with pytest.raises(ValueError, match="has folds \\[0, 1, 2, 3, 4\\], expected 3 folds"):
        load_or_make_folds(path, samples, 4, folds=3, holdout=0.1, seed=0)
    with pytest.raises(ValueError, match="1 images of the data are not in"):
        load_or_make_folds(path, samples + [Sample("new.jpg", Path("new.jpg"), ("",) * 4, Path("."))], 4)
    with pytest.raises(ValueError, match="names 1 images that are not in the data"):
        load_or_make_folds(path, [s for s in samples if s.image_id != samples[0].image_id], 4)


def test_split_cli_writes_folds_and_prints_counts(
    tmp_path: Path, synth_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "folds.csv"
    argv = ["split", "--data", str(synth_dir), "--height", "64", "--width", "320", "--out", str(out)]
    assert trainer_main(argv + ["--holdout", "6", "--folds", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"48 images -> {out}" in printed and "holdout" in printed and "3:scratches" in printed
    assignment = read_folds(out)
    assert sum(f == HOLDOUT for f in assignment.values()) == 6 and max(assignment.values()) == 3
    # Same arguments: same split, so rewriting is fine; a different split needs --force.
    assert trainer_main(argv + ["--holdout", "6", "--folds", "4"]) == 0
    assert trainer_main(argv + ["--seed", "5"]) == 2
    assert "exists with a different split; pass --force" in capsys.readouterr().err
    assert trainer_main(argv + ["--seed", "5", "--force"]) == 0
    assert trainer_main(["split", "--data", str(tmp_path / "missing")]) == 2
    assert "data folder" in capsys.readouterr().err


def test_reused_folds_warn_when_labels_changed(
    tmp_path: Path, samples: list[Sample], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "folds.csv"
    load_or_make_folds(path, samples, 4)
    relabelled = [Sample(s.image_id, s.path, ("1 5",) + s.rles[1:], s.source) for s in samples]
    with caplog.at_level("WARNING", logger="trainer.splits"):
        load_or_make_folds(path, relabelled, 4)
    assert "labels changed since the folds were made" in caplog.text
