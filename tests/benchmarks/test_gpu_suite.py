"""``benchmarks/gpu_suite.sh``: its syntax, and the whole script in its CPU dry run.

The dry run executes every stage a CPU can (checks, model builds, throughput for two model sets,
stream at full speed and at a fixed rate) through the same code paths as on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.sh"
EXPECTED_FILES = {
    "gpu_suite.md", "gpu_suite.log", "throughput-single.json", "throughput-single.png",
    "throughput-ensemble.json", "throughput-ensemble.png", "stream.json", "stream-fps.json",
}


def test_script_parses() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_unknown_argument_is_refused() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument --gpu" in done.stderr


def test_stages_past_the_budget_are_skipped_and_reported(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_SUITE_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable,
           "GPU_SUITE_BUDGET_S": "0"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run"], capture_output=True, text=True, env=env,
                          timeout=120)
    summary = (out / "gpu_suite.md").read_text()
    assert done.returncode == 1
    assert "- checks: skipped, the suite's 0 s budget is spent" in summary
    assert "- no benchmark: the checks did not run" in summary
    assert {p.name for p in out.iterdir()} <= EXPECTED_FILES


@pytest.mark.slow  # about a minute: nine Python processes importing torch, two model builds
def test_cpu_dry_run_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_SUITE_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run"], capture_output=True, text=True, env=env,
                          timeout=600)
    summary = (out / "gpu_suite.md").read_text()
    assert done.returncode == 0, summary + done.stdout[-3000:]
    # A lent machine returns at most 8 files from $OUT: the suite writes exactly these.
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert "FAILED" not in summary and "TIMED OUT" not in summary and "skipped, the suite" not in summary
    assert "backends to measure: onnxruntime,torch,naive" in summary
    for stage in ("single throughput", "stream: onnxruntime, saturation", "stream: onnxruntime, fixed rate",
                  "ensemble model (2 fold(s))", "ensemble throughput"):
        assert f"- {stage}" in summary
    assert summary.count("### bench throughput") == 2 and summary.count("### bench stream") == 2

    for name, folds in (("single", 1), ("ensemble", 2)):
        report = json.loads((out / f"throughput-{name}.json").read_text())
        assert {r["backend"] for r in report["rows"]} == {"naive", "onnxruntime", "torch"}
        assert {r["batch_size"] for r in report["rows"] if r["backend"] != "naive"} == {1, 2}
        assert all(m["summary"].startswith(f"{folds} x resnet18") for m in report["models"])
        assert all(c["equal"] for c in report["naive_agreement"])
        assert (out / f"throughput-{name}.png").read_bytes()[:4] == b"\x89PNG"
    stream = json.loads((out / "stream.json").read_text())
    assert [s["streams"] for s in stream["settings"]] == [1, 2]
    assert all(s["answered"] == 4 and s["errors"] == 0 for s in stream["settings"])
    (fixed,) = json.loads((out / "stream-fps.json").read_text())["settings"]
    assert fixed["fps_per_stream"] == 20 and fixed["answered"] == 4
