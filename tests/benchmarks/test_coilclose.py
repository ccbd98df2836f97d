"""``bench coil-close`` on a short coil: it writes the coil, closes it and reports what it timed."""

from __future__ import annotations

import json

import pytest

from benchmarks import cli


def test_bench_coil_close_reports_the_close_of_the_coil_it_wrote(tmp_path, capsys) -> None:
    report = tmp_path / "close.json"
    db = tmp_path / "coils.db"
    assert cli.main(["coil-close", "--frames", "90", "--json", str(report), "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### bench coil-close: ") and "close_coil: " in out
    figures = json.loads(report.read_text())
    assert figures["frames"] == 180 and figures["length_m"] == pytest.approx(90 * 0.128)
    assert 0 < figures["records"] <= figures["components"] and figures["close_s"] > 0

    from benchmarks.coilclose import bench_line
    from coils.store import CoilStore

    store = CoilStore.open(f"sqlite:///{db}", bench_line(2))
    summary, records = store.get_coil("BENCH")
    assert summary.state == "closed" and len(records) == figures["records"] == summary.defects
    assert any(len(r.cameras) == 2 for r in records)  # the stains over the lanes' overlap: one record each
    assert any(len({f for _, f in r.frames}) >= 4 for r in records)  # scratches over several frame boundaries
