"""The compiled periodic-defect search (numba) gives the numpy path's finds to the last bit: periods,
confidences, records and order, on dense random coils with planted repeats, continuous and
pixel-quantised (where exact ties between records decide the walks)."""

from __future__ import annotations

import numpy as np
import pytest

from coils import periodic
from coils.line import Line, Roll
from coils.periodic import PeriodicConfig, band_keys, find_periodic
from coils.records import DefectRecord

pytestmark = pytest.mark.skipif(periodic._kernel() is None, reason="numba is not installed: numpy searches")


def random_coil(seed: int) -> tuple[Line, list[DefectRecord], PeriodicConfig]:
    """A coil of random defects (up to 1,500) and up to three planted repeats, some at a roll's circumference,
    with along noise or none, missed turns, twins either side of a mark (equally near its place), positions on a pixel grid or not; a config varied around the default."""
    rng = np.random.default_rng(seed)
    width = float(rng.choice([300.0, 1000.0]))
    rolls = tuple(Roll(f"roll{i}", float(rng.uniform(100, 700))) for i in range(int(rng.integers(0, 3))))
    line, length = Line("line", width, (), rolls), float(rng.uniform(2000, 30000))
    grid = float(rng.choice([0.0, 0.25, 0.5, 1.0]))
    places: list[tuple[int, float, float, float]] = [
        (int(rng.integers(1, 5)), rng.uniform(0, length), rng.uniform(0, width - 4), rng.uniform(0.5, 4))
        for _ in range(int(rng.integers(0, 1500)))]
    for _ in range(int(rng.integers(0, 4))):
        period = rolls[0].circumference_mm if rolls and rng.random() < 0.5 else rng.uniform(60, 3000)
        noise, class_id, across = float(rng.choice([0.0, 0.3, 1.5])), int(rng.integers(1, 5)), rng.uniform(0, width - 10)
        marks = [along + rng.normal(0, noise) for along in np.arange(rng.uniform(0, period), length, period)
                 if rng.random() > 0.2]
        twins = [along + side for along in marks if rng.random() < 0.3 for side in (-1.0, 1.0)]  # ties around a mark
        places += [(class_id, along, across + rng.normal(0, 1), 2.0) for along in marks + twins]
    records = []
    for class_id, along, across, size in (places[i] for i in rng.permutation(len(places))):
        if grid:
            along, across = round(along / grid) * grid, round(across / grid) * grid
        records.append(DefectRecord("coil", class_id, along, along + size, across, across + size, size * size,
                                    None, (), ()))
    config = PeriodicConfig(alpha=float(rng.choice([1e-4, 1e-6, 0.5])), tolerance_mm=float(rng.choice([3.0, 1.0])),
                            min_count=int(rng.choice([4, 3, 6])))
    return line, records, config


def test_the_compiled_search_gives_the_numpy_paths_finds_to_the_last_bit() -> None:
    finds = 0
    for seed in range(60):
        line, records, config = random_coil(seed)
        reference = [d.to_dict() for d in find_periodic(line, records, config, compiled=False)]
        assert [d.to_dict() for d in find_periodic(line, records, config)] == reference, seed
        only = {band_keys(r, config)[0] for r in records[::3]}
        assert (find_periodic(line, records, config, only)
                == find_periodic(line, records, config, only, compiled=False)), seed
        finds += len(reference)
    assert finds > 60  # the comparison covered finds, not just empty answers


def test_a_walk_of_more_turns_than_the_first_lgamma_table_is_found_alike() -> None:
    line = Line("line", 1000.0, (), ())
    turns = len(periodic._LGAMMA) + 500
    records = [DefectRecord("coil", 1, along, along + 2, 500.0, 502.0, 4.0, None, (), ())
               for along in 60.0 * np.arange(turns)]
    config = PeriodicConfig(max_period_mm=200.0)
    reference = find_periodic(line, records, config, compiled=False)
    assert reference and reference[0].count == turns
    assert find_periodic(line, records, config) == reference
