"""``trainer.rundir``: the run directory's shared files under concurrent writers, and the typed resume state."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import rundir
from trainer.splits import read_folds

ROOT = Path(__file__).resolve().parents[2]


def _fit_command(data: Path, out: Path, fold: int) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "fit", "--data", str(data), "--out", str(out), "--fold", str(fold),
            "--encoder", "resnet18", "--encoder-weights", "none", "--encoder-depth", "3", "--decoder-channels",
            "8,8,4", "--scale", "0.5", "--folds", "2", "--holdout", "0.15", "--epochs", "1", "--batch-size", "8",
            "--no-balance", "--device", "cpu", "--workers", "0", "--no-progress"]


def test_two_fit_processes_share_one_run_directory(synth_dir: Path, tmp_path: Path) -> None:
    """`trainer fit --fold 0` and `--fold 1` started together on one new run directory: both write
    config.json and folds.csv if nobody holds the lock; with it, one writes and the other reads."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(_fit_command(synth_dir, out, k), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    config = json.loads((out / rundir.CONFIG).read_text())
    assert config["folds"] == 2 and config["epochs"] == 1
    assignment = read_folds(out / rundir.FOLDS)
    assert sorted(set(assignment.values())) == [-1, 0, 1]
    for k in (0, 1):
        assert (out / f"fold{k}" / rundir.BEST).is_file() and (out / f"fold{k}" / rundir.LAST).is_file()
    assert json.loads((out / rundir.REPORT_JSON).read_text())["training"]["folds"]
    assert not [p.name for p in out.rglob("*.tmp")]
    # Both processes used the same split: a third, single run with the same settings reads it back unchanged.
    before = (out / rundir.FOLDS).read_bytes()
    done = subprocess.run(_fit_command(synth_dir, out, 0), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "finished earlier" in done.stderr and (out / rundir.FOLDS).read_bytes() == before


def test_fit_waits_for_the_run_lock_before_writing_shared_files(synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with rundir.locked(out):  # this process holds it; the fit below is another process
        process = subprocess.Popen(_fit_command(synth_dir, out, 0), cwd=ROOT, env=env, stderr=subprocess.PIPE,
                                   text=True)
        waited = []
        for line in process.stderr:
            waited.append(line)
            if "waiting for" in line and rundir.LOCK in line:
                break
        assert waited and "waiting for" in waited[-1], "".join(waited)
        time.sleep(0.5)
        assert process.poll() is None and not (out / rundir.CONFIG).exists() and not (out / rundir.FOLDS).exists()
    rest = process.communicate(timeout=300)[1]
    assert process.returncode == 0, "".join(waited) + rest
    assert (out / rundir.CONFIG).is_file() and (out / rundir.FOLDS).is_file() and (out / "fold0" / rundir.BEST).is_file()


def _hold_lock(run_dir: str, held: multiprocessing.Event, release: multiprocessing.Event) -> None:
    with rundir.locked(run_dir):
        held.set()
        release.wait(30)


def test_the_lock_excludes_another_process(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), held, release))
    holder.start()
    try:
        assert held.wait(30)
        code = ("import sys, fcntl; from trainer import rundir\n"
                f"f = open({str(tmp_path / rundir.LOCK)!r}, 'a+b')\n"
                "try:\n    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")
        blocked = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
        assert blocked.returncode == 3  # another process cannot take it while it is held
    finally:
        release.set()
        holder.join(30)
    started = time.perf_counter()
    with rundir.locked(tmp_path):  # free again
        assert time.perf_counter() - started < 30


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    rundir.atomic_write_text(target, "first")
    rundir.atomic_write_text(target, "second")
    assert target.read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_training_state_refuses_missing_or_unknown_keys() -> None:
    state = dict(optimizer={}, scheduler=None, scaler=None, early_stopping={}, rng={}, seconds=1.0, finished=False,
                 best_epoch=1, best_val_loss=0.5)
    assert rundir.TrainingState.from_dict(state).to_dict() == state
    with pytest.raises(ValueError, match=r"lacks \['rng'\]"):
        rundir.TrainingState.from_dict({k: v for k, v in state.items() if k != "rng"})
    with pytest.raises(ValueError, match=r"unknown keys \['epochs'\]"):
        rundir.TrainingState.from_dict({**state, "epochs": 3})
    with pytest.raises(ValueError, match="no training state"):
        rundir.TrainingState.from_dict(None, "best.pt")
