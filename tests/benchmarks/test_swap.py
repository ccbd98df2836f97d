"""``bench swap``: a short run with the tiny models. No timing is asserted: every figure must be
present and consistent, and no frame but the bad ones may fail."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import cli


def test_bench_swap_reports_swaps_shadow_cost_and_memory(tiny_onnx: Path, defect_onnx: Path, tmp_path: Path,
                                                         capsys) -> None:
    out = tmp_path / "swap.json"
    rc = cli.main(["swap", "--model", str(defect_onnx), "--second", str(tiny_onnx), "--streams", "2",
                   "--duration", "6", "--swap-every", "1.5", "--shadow-share", "0.5", "--bad-share", "0.1",
                   "--max-batch", "4", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and json.loads(capsys.readouterr().out) == report
    assert report["swaps"] >= 2 and report["frames"] > 0
    assert report["errors_not_bad"] == 0 and report["bad_frames"] > 0
    assert report["shadow_frames"] + report["shadow_skipped"] > 0
    assert report["frames_per_s"]["no_shadow"] > 0 and report["frames_per_s"]["shadow"] > 0
    assert report["worst_ms_around_swaps"] > 0 and report["p99_ms_elsewhere"] > 0
    assert report["rss_mb_after_first_fifth"] > 0 and report["rss_mb_end"] > 0
