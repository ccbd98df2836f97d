"""``tools/compare_training.py`` end to end on a tiny budget: both runs train, share a holdout, and the table is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
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
    report = json.loads((out / "comparison.json").read_text())
    rows = report["runs"]
    assert [r["epochs"] for r in rows] == [1, 1]  # the budget stops each after its first epoch
    assert rows[0]["images"] == rows[1]["images"] > 0
    assert (out / "baseline" / "folds.csv").read_text() == (out / "product" / "folds.csv").read_text()
    assert rows[0]["thresholds"] == [0.5] * 4 and rows[0]["tta"] == "none"
    assert rows[1]["tta"] == "hflip" and (out / "product" / "postprocess.json").is_file()
    baseline_cfg = json.loads((out / "baseline" / "config.json").read_text())
    assert (baseline_cfg["balance"], baseline_cfg["prior_init"], baseline_cfg["augment"]) == (False, False, "none")
    markdown = (out / "comparison.md").read_text()
    assert markdown.count("\n| baseline") == 2 and markdown.count("\n| product") == 2
    assert "Kaggle metric (mean ± std)" in markdown and "label accuracy" in markdown
    assert report["summary"][rows[0]["name"]]["seeds"] == 1 and report["summary"][rows[0]["name"]]["kaggle"]["std"] == 0.0


def test_seed_summary_is_mean_and_sample_std_and_checks_every_seed() -> None:
    spec = importlib.util.spec_from_file_location("compare_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [{"name": name, "seed": seed, "kaggle": k, "label_accuracy": a, "minutes": 1.0, "epochs": 3}
            for name, seed, k, a in [("base", 0, 0.80, 0.5), ("prod", 0, 0.90, 0.8), ("base", 1, 0.84, 0.6),
                                     ("prod", 1, 0.82, 0.9)]]
    stats = module.summary(rows)
    assert stats["base"]["kaggle"]["mean"] == pytest.approx(0.82)
    assert stats["base"]["kaggle"]["std"] == pytest.approx(0.0282843, abs=1e-6)  # sample std of 0.80, 0.84
    assert stats["prod"]["label_accuracy_above_baseline_every_seed"] is True
    assert stats["prod"]["kaggle_above_baseline_every_seed"] is False  # seed 1: 0.82 < 0.84
    assert "above the baseline in every seed: no" in module.summary_table(stats)


def test_product_plan_trains_what_trainer_fit_plans_on_the_shared_split(synth_dir: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("compare_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.set_num_threads(1)
    out = tmp_path / "compare"
    assert module.main(["--data", str(synth_dir), "--out", str(out), "--budget-min", "0.001", "--product-plan",
                        "--network", "decoder_channels=16,8,4", "--network", "folds=2"]) == 0
    rows = json.loads((out / "comparison.json").read_text())["runs"]
    assert [r["epochs"] for r in rows] == [1, 1] and rows[0]["images"] == rows[1]["images"]
    assert (out / "baseline" / "folds.csv").read_text() == (out / "product" / "folds.csv").read_text()
    product = json.loads((out / "product" / "config.json").read_text())
    assert product["budget_min"] == 0.001 and product["planned"]["choices"]["scale"]["reason"] != "given"
    assert product["planned"]["choices"]["fold"]["value"] == 0
