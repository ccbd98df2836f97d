"""Periodic defects: a roll mark planted by the line simulator among random defects is found at its
period (within 1 %) and its roll named; dense random defects with no repeat give nothing."""

from __future__ import annotations

import math
import time

import numpy as np

from coils.line import Line, Roll
from coils.periodic import PeriodicDefect, find_periodic, match_roll
from coils.records import DefectRecord
from trainer.synth_line import LineSpec, plan_coil, truth_of


def simulated(plain: int, seed: int = 0, roll_diameter_mm: float = 600.0
              ) -> tuple[Line, list[DefectRecord], list[int]]:
    """A synth-line coil's planted defects as records (a perfect model's): a roll mark and ``plain`` random ones.

    Returns:
        the line, the records, and the indices of the roll mark's records.
    """
    spec = LineSpec(cameras=2, frames=200, height=128, width=800, overlap_px=32, mm_per_px=0.5,
                    roll_diameter_mm=roll_diameter_mm, plain_defects=plain, seed=seed)
    truth = truth_of(spec, "coil", plan_coil(spec, 0))
    records = [DefectRecord("coil", t.class_id, t.along_start_mm, t.along_end_mm, t.across_start_mm,
                            t.across_end_mm, t.area_mm2, None, (), ()) for t in truth]
    return spec.line(), records, [i for i, t in enumerate(truth) if t.kind == "roll_mark"]


def test_a_roll_mark_among_50_random_defects_is_found_within_1_percent_and_its_roll_named() -> None:
    for seed in range(3):
        line, records, marks = simulated(plain=50, seed=seed)
        found = find_periodic(line, records)
        roll = line.rolls[0]
        assert len(found) == 1, found
        mark = found[0]
        assert abs(mark.period_mm - roll.circumference_mm) / roll.circumference_mm < 0.01
        assert mark.roll == roll.name and mark.class_id == 1 and mark.confidence > 0.999
        assert sorted(mark.records) == marks and mark.count == len(marks) > 4
        assert mark.first_mm == min(_centre(records[i]) for i in marks)
        assert mark.last_mm == max(_centre(records[i]) for i in marks)


def test_dense_random_defects_without_a_repeat_give_no_periodic_defect() -> None:
    rng = np.random.default_rng(7)
    line, _, _ = simulated(plain=0)
    length = 200 * 64.0
    records = []
    for _ in range(3000):  # about 19 per metre: several per band and period
        along, across = rng.uniform(0, length - 4), rng.uniform(0, line.strip_width_mm - 4)
        size = rng.uniform(0.5, 4)
        records.append(DefectRecord("coil", int(rng.integers(1, 5)), along, along + size, across, across + size,
                                    size * size, None, (), ()))
    started = time.perf_counter()
    assert find_periodic(line, records) == []
    assert time.perf_counter() - started < 10


def test_a_repeat_among_dense_random_defects_is_still_found() -> None:
    rng = np.random.default_rng(3)
    line = Line("l", 1000.0, (), (Roll("top", 300.0), Roll("bottom", 450.0)))
    period = math.pi * 450.0
    records = [DefectRecord("c", 2, a, a + 2, 500.0, 503.0, 6.0, None, (), ())
               for a in np.arange(100.0, 20000.0, period) + rng.normal(0, 0.5, 15)]
    for _ in range(1500):
        along, across = rng.uniform(0, 20000), rng.uniform(0, 996)
        records.append(DefectRecord("c", 2, along, along + 2, across, across + 3, 6.0, None, (), ()))
    found = find_periodic(line, records)
    assert [(f.roll, f.count >= 14) for f in found] == [("bottom", True)]
    assert abs(found[0].period_mm - period) / period < 0.01


def test_roll_matching_and_json_round_trip() -> None:
    line = Line("l", 1000.0, (), (Roll("a", 600.0), Roll("b", 606.0)))
    assert match_roll(line, math.pi * 600 * 1.009) == "b"
    assert match_roll(line, math.pi * 600 * 0.995) == "a"
    assert match_roll(line, math.pi * 600 * 0.98) == ""
    defect = PeriodicDefect(1, 10.0, 12.0, 1885.0, 0.99, 5.0, 9000.0, 5, "a", (1, 4, 9))
    assert PeriodicDefect.from_dict(defect.to_dict()) == defect


def _centre(record: DefectRecord) -> float:
    return (record.along_start_mm + record.along_end_mm) / 2



def test_the_walks_line_fit_is_numpys_polyfit_to_the_last_bit() -> None:
    from coils.periodic import _fit_line

    rng = np.random.default_rng(5)
    for n in (2, 3, 8, 40, 300):
        turns = np.sort(rng.choice(np.arange(400), n, replace=False)).astype(float)
        along = rng.uniform(0, 500) + turns * rng.uniform(300, 3000) + rng.normal(0, 2, n)
        assert _fit_line(turns, along).tolist() == np.polyfit(turns, along, 1).tolist()
