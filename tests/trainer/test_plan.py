"""``trainer fit``'s planner (trainer.plan), the data fingerprint (trainer.fingerprint) and the budget
(trainer.budget): choices on constructed fingerprints, flags winning, config.json recording the plan, and
a real tiny training stopped by its budget with the cosine schedule fitted to the epochs it held."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.budget import EpochBudget, epochs_for_budget
from trainer.config import FitConfig, FitOptions, FitSettings, resolve
from trainer.fingerprint import (
    ClassStats,
    DataFingerprint,
    MachineFingerprint,
    component_widths,
    data_fingerprint,
)
from trainer.fit import run_fit
from trainer.plan import GIVEN, Situation, make_plan
from trainer.rundir import TrainingState, read_metrics
from trainer.speed import Speed

CPU = MachineFingerprint(cores=2, cpu="test CPU", cpu_bf16=False, cuda=False)
GPU = MachineFingerprint(cores=16, cpu="test CPU", cpu_bf16=False, cuda=True, gpu="test GPU", gpu_memory_gib=80.0)


def fingerprint(height: int, width: int, widths: list[float | None], frames: int = 1000) -> DataFingerprint:
    classes = tuple(ClassStats(frames=100, frequency=0.1, pixel_fraction=0.01, components=0 if w is None else 50,
                               width_p10=w, extent_p90=None if w is None else 4 * w) for w in widths)
    return DataFingerprint(height=height, width=width, frames=frames, measured_frames=frames, classes=classes,
                           class_names=tuple(f"class {k + 1}" for k in range(len(widths))))


def situation(data: DataFingerprint, machine: MachineFingerprint = CPU, budget_min: float | None = None,
              speed: Speed | None = None) -> Situation:
    return Situation(data=data, machine=machine, budget_min=budget_min, folds=5, holdout=0.1, arch="unet",
                     speed=speed)


def test_thinner_defects_get_a_larger_training_scale() -> None:
    """The scale is the smallest that keeps the thinnest common class >= 4 px wide (a rare class does not decide)."""
    wide = make_plan(situation(fingerprint(256, 1600, [40.0, 20.0])), {})
    thin = make_plan(situation(fingerprint(256, 1600, [40.0, 6.0])), {})
    assert wide.choices["scale"].value == 0.25  # 20 px -> 5 px at 1/4; 2.5 px at 1/8
    assert thin.choices["scale"].value == 1.0  # 6 px -> 3 px at 1/2
    assert "class 2" in thin.choices["scale"].reason
    rare = fingerprint(256, 1600, [40.0, 2.0])
    rare = DataFingerprint(**{**rare.__dict__, "classes": (rare.classes[0], ClassStats(3, 0.003, 1e-5, 3, 2.0, 8.0))})
    assert make_plan(situation(rare), {}).choices["scale"].value == 0.125  # 40 px decides; 3 components do not
    # A small frame keeps a short side of at least 32 px whatever the defects' width.
    assert make_plan(situation(fingerprint(64, 64, [200.0])), {}).choices["scale"].value == 0.5


def test_small_training_frames_train_whole_and_large_ones_on_crops() -> None:
    small = make_plan(situation(fingerprint(200, 200, [15.0])), {})
    assert small.choices["scale"].value == 0.5 and small.choices["crop"].value is None
    assert "whole frames" in small.choices["crop"].reason
    large = make_plan(situation(fingerprint(256, 1600, [20.0])), {})  # 64x400 at 1/4
    assert large.choices["crop"].value == (64, 128)
    assert large.choices["encoder_depth"].value == 3 and large.choices["decoder_channels"].value == (32, 16, 8)
    on_gpu = make_plan(situation(fingerprint(256, 1600, [5.0]), GPU), {})  # full resolution, 256x256 crops
    assert on_gpu.choices["crop"].value == (256, 256) and on_gpu.choices["encoder_depth"].value == 5
    assert on_gpu.choices["batch_size"].value == 32


def test_tiny_data_caps_the_batch() -> None:
    plan = make_plan(situation(fingerprint(64, 64, [30.0], frames=20)), {})
    assert plan.choices["batch_size"].value == 2 and "training frames" in plan.choices["batch_size"].reason
    assert make_plan(situation(fingerprint(200, 200, [15.0])), {}).choices["batch_size"].value == 8


def test_the_budget_decides_epochs_patience_and_fold() -> None:
    data = fingerprint(200, 200, [15.0])
    unbounded = make_plan(situation(data), {})
    assert unbounded.choices["epochs"].value == 150 and unbounded.choices["patience"].value == 15
    assert unbounded.choices["fold"].value is None
    # 720 training and 180 validation frames of 100x100 at 1e-6 s a pixel: 9 s an epoch, 33 in 5 minutes.
    budget = make_plan(situation(data, budget_min=5, speed=Speed(1e-6, 1e-6)), {})
    assert budget.choices["fold"].value == 0 and budget.choices["scale"].value == 0.5
    assert budget.choices["patience"].value == budget.choices["epochs"].value  # early stopping off
    assert "about 33 epochs" in budget.choices["epochs"].reason
    assert epochs_for_budget(300, 0, 10.0, 0, 300) == 30
    assert epochs_for_budget(300, 0, 10.0, 0, 12) == 12  # --epochs caps it
    assert epochs_for_budget(300, 295, 10.0, 7, 300) == 7  # spent: never before the epochs done


def test_the_measured_speed_estimates_epochs_but_never_changes_a_choice() -> None:
    """At 1e-5 s a pixel 1/2 leaves 3 epochs in 5 minutes: the plan says so, and still trains at 1/2."""
    data = fingerprint(200, 200, [15.0])
    fast = make_plan(situation(data, budget_min=5, speed=Speed(1e-6, 1e-6)), {})
    slow = make_plan(situation(data, budget_min=5, speed=Speed(1e-5, 1e-5)), {})
    assert {k: c.value for k, c in slow.choices.items()} == {k: c.value for k, c in fast.choices.items()}
    assert "about 3 epochs" in slow.choices["epochs"].reason and "few" in slow.choices["epochs"].reason
    assert "few" not in fast.choices["epochs"].reason


def test_given_values_win_and_say_so() -> None:
    data = fingerprint(256, 1600, [6.0])
    plan = make_plan(situation(data, budget_min=5), {"scale": 0.25, "crop": None, "decoder_channels": (16, 8),
                                                    "fold": 1, "epochs": 40})
    for key, value in (("scale", 0.25), ("crop", None), ("decoder_channels", (16, 8)), ("fold", 1), ("epochs", 40)):
        assert plan.choices[key] == plan.choices[key].__class__(value, GIVEN)
    assert plan.choices["encoder_depth"].value == 2  # one stage per given decoder width
    assert plan.choices["patience"].value == 40  # follows the given epochs
    # The crop rule sees the given scale: 64x400 gets crops, 256x1600 (planned 1.0) would get them too, 32x200 not.
    assert make_plan(situation(data), {"scale": 0.125}).choices["crop"].value is None


def test_component_widths_measure_thickness_at_any_angle() -> None:
    mask = np.zeros((80, 80), np.uint8)
    mask[10:13, 5:75] = 1  # a 3-px horizontal line
    for i in range(60):  # a 5-px diagonal line
        mask[15 + i, 5 + i:10 + i] = 1
    mask[60:80, 0:20] = 1  # a 20-px square at the frame's corner (cut by the edge)
    table = component_widths(mask)
    widths = sorted(table[:, 0])
    assert widths[0] == pytest.approx(3, abs=0.5) and widths[2] == pytest.approx(20, abs=1)
    assert 3 <= widths[1] <= 6  # the diagonal measures across, not along
    assert sorted(table[:, 1]) == sorted([210.0, 300.0, 400.0])


def test_fingerprint_of_synthetic_data(synth_dir: Path, synth_cfg) -> None:
    from trainer.data import load_samples

    samples = load_samples(synth_dir, synth_cfg)
    fp = data_fingerprint(samples, synth_cfg)
    assert (fp.height, fp.width, fp.frames) == (64, 320, len(samples))
    frequency = [sum(1 for s in samples if k + 1 in s.labels) / len(samples) for k in range(4)]
    assert [c.frequency for c in fp.classes] == pytest.approx(frequency, abs=1e-4)
    assert fp.thinnest() is not None and all(c.width_p10 is None or c.width_p10 >= 1 for c in fp.classes)


def test_epoch_budget_refits_when_the_speed_changes() -> None:
    budget = EpochBudget(seconds=100.0, most=300)
    assert not budget.record(1, 10.0, 10.0) and budget.epochs == 10
    assert not budget.record(2, 10.5, 20.5) and budget.epochs == 10  # within 10 %: kept
    assert not budget.record(3, 5.0, 25.5)  # median of epochs 2-3: 7.75 s, faster: re-fitted
    assert budget.epochs == 3 + int((100 - 25.5) // 7.75)
    restored = EpochBudget.restored(budget.state(), seconds=100.0, most=300)
    assert restored == budget
    slow = EpochBudget(seconds=30.0, most=300)
    assert not slow.record(1, 10.0, 10.0) and slow.epochs == 3
    assert slow.record(2, 15.0, 25.0) and slow.epochs == 2  # the next epoch no longer fits: it ends here


def tiny_budget_config(data: Path, budget_min: float) -> FitConfig:
    return resolve(FitSettings(data=[str(data)], encoder="resnet18", encoder_weights="none", encoder_depth=3,
                               decoder_channels=(8, 8, 4), scale=0.5, folds=2, holdout=0.15, epochs=60, patience=60,
                               batch_size=8, lr=4e-3, lr_schedule="cosine", balance=False, augment="none",
                               budget_min=budget_min))


def test_the_budget_stops_a_real_training_at_the_end_of_its_fitted_schedule(synth_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    budget_min = 0.1
    cfg = tiny_budget_config(synth_dir, budget_min)
    out = tmp_path / "run"
    [outcome] = run_fit(cfg, FitOptions(out=str(out), fold=0, device="cpu", workers=0, progress=False))
    assert outcome.budget_spent and not outcome.stopped_early and 1 <= outcome.epochs_run < 60
    rows = read_metrics(out / "fold0" / "metrics.csv")
    assert len(rows) == outcome.epochs_run
    # No epoch started after the budget was spent.
    assert sum(float(r["seconds"]) for r in rows[:-1]) < budget_min * 60
    from network.checkpoint import read_fold_checkpoint

    state = TrainingState.from_dict(read_fold_checkpoint(out / "fold0" / "last.pt").training)
    assert state.finished and state.budget["epochs"] == outcome.epochs_run
    if outcome.epochs_run > 1:
        # The cosine schedule was fitted to the epochs run: its last step is near 0, not near --lr as a
        # 60-epoch schedule would be after a few epochs.
        assert float(rows[-1]["lr"]) < 0.25 * cfg.optim.lr
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["folds"][0]["finished"] is True  # ended by the budget, not "unfinished"
    again = run_fit(cfg, FitOptions(out=str(out), fold=0, device="cpu", workers=0, progress=False))
    assert again[0].epochs_run == outcome.epochs_run  # finished: a rerun skips it


def test_cli_records_the_plan_and_a_rerun_reuses_it(synth_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.cli import main

    out = tmp_path / "run"
    command = ["fit", "--data", str(synth_dir), "--out", str(out), "--budget-min", "0.05", "--scale", "0.5",
               "--decoder-channels", "8,8,4", "--encoder-weights", "none", "--folds", "2", "--no-balance", "--device", "cpu",
               "--workers", "0",
               "--no-progress"]
    assert main([*command, "--plan-only"]) == 0
    printed = capsys.readouterr().out
    assert "scale" in printed and "given" in printed and not out.exists()
    assert main(command) == 0
    saved = json.loads((out / "config.json").read_text())
    choices = saved["planned"]["choices"]
    assert choices["scale"] == {"value": 0.5, "reason": GIVEN}
    assert choices["decoder_channels"]["reason"] == GIVEN and choices["encoder_depth"]["value"] == 3
    assert choices["crop"]["reason"] != GIVEN and choices["fold"]["value"] == 0
    assert saved["patience"] == saved["epochs"] and saved["budget_min"] == 0.05
    assert saved["planned"]["fingerprint"]["data"]["frames"] > 0
    assert FitConfig.from_dict(saved).scale == 0.5  # readers of config.json skip the plan
    assert main(command) == 0  # same command: the recorded plan, no "other settings" refusal


def test_a_rerun_reuses_the_recorded_plan_but_not_a_given_fold(tmp_path: Path) -> None:
    from trainer.plan import recorded_plan

    path = tmp_path / "config.json"
    assert recorded_plan(path, {}) is None
    planned = {"choices": {"scale": {"value": 0.5, "reason": "thin"}, "crop": {"value": [64, 128], "reason": "big"},
                           "fold": {"value": 1, "reason": GIVEN}}, "fingerprint": {}}
    path.write_text(json.dumps({"scale": 0.5, "crop": [64, 128], "batch_size": 8, "planned": planned}))
    plan = recorded_plan(path, {"batch_size": 4})
    assert plan.choices["scale"].value == 0.5 and plan.choices["scale"].reason.startswith("thin")
    assert plan.choices["crop"].value == (64, 128) and plan.choices["batch_size"].reason == GIVEN
    assert "fold" not in plan.choices  # fold 1 was that invocation's
    path.write_text(json.dumps({"scale": 0.25, "crop": None}))  # a run written before the planner
    old = recorded_plan(path, {})
    assert old.choices["scale"].value == 0.25 and old.choices["crop"].value is None
