"""``tools/compare_training.py`` end to end on a tiny budget: both runs train, share a holdout, and the table is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "compare_training.py"


def test_compare_training_runs_end_to_end(synth_dir: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("compare_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.set_num_threads(1)
    out = tmp_path / "compare"
    assert module.main(["--data", str(synth_dir), "--out", str(out), "--budget-min", "0.001",
                        "--network", "decoder_channels=16,8,4", "--network", "folds=2"]) == 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["epochs"] for r in rows] == [1, 1]  # the budget stops each after its first epoch
    assert rows[0]["images"] == rows[1]["images"] > 0
    assert (out / "baseline" / "folds.csv").read_text() == (out / "product" / "folds.csv").read_text()
    assert rows[0]["thresholds"] == [0.5] * 4 and rows[0]["tta"] == "none"
    assert rows[1]["tta"] == "hflip" and (out / "product" / "postprocess.json").is_file()
    baseline_cfg = json.loads((out / "baseline" / "config.json").read_text())
    assert (baseline_cfg["balance"], baseline_cfg["prior_init"], baseline_cfg["augment"]) == (False, False, "none")
    markdown = (out / "comparison.md").read_text()
    assert markdown.count("\n| ") == 2 and "Kaggle metric" in markdown and "label accuracy" in markdown
