"""``trainer fit`` on tiny synthetic data: run directory contents, resume, settings pinning, config, offline weights."""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from network.checkpoint import fold_metadata, load_checkpoint, load_fold, read_fold_checkpoint
from network.inspection import InspectionModel
from network.processing import downscale_masks
from trainer import loop
from trainer.commands import fit as fit_command
from trainer.config import FitConfig, FitOptions, FitSettings, differences, read_config_file, resolve
from trainer.fit import EpochEnd, run_fit
from trainer.pretrained import check_pretrained_reachable
from trainer.priors import class_pixel_priors, init_output_prior
from trainer.rundir import read_metrics
from trainer.splits import read_folds


def tiny_config(data: Path, **overrides) -> FitConfig:
    """A U-Net small enough for seconds per epoch on one shared CPU core (64x320 frames, trained at 32x160),
    with the plain recipe (BCE, constant Adam 1e-3, no augmentation) whose loss falls within two epochs."""
    values = dict(data=[str(data)], encoder="resnet18", encoder_weights="none", encoder_depth=3,
                  decoder_channels=(16, 8, 4), scale=0.5, folds=2, holdout=0.15, epochs=2, patience=5, batch_size=8,
                  loss="bce", lr=1e-3, lr_schedule="none", augment="none")
    values.update(overrides)
    return resolve(FitSettings(**values))


def options(out: Path, **overrides) -> FitOptions:
    return FitOptions(**{"out": str(out), "fold": 0, "device": "cpu", "workers": 0, "progress": False, **overrides})


def test_short_fit_writes_checkpoints_metrics_curves_and_report(synth_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(synth_dir)
    out = tmp_path / "run"
    outcomes = run_fit(cfg, options(out))
    assert [o.fold for o in outcomes] == [0] and not outcomes[0].stopped_early and outcomes[0].epochs_run == 2

    saved = json.loads((out / "config.json").read_text())
    assert saved == cfg.to_dict()
    assert saved["height"] == 64 and saved["width"] == 320  # read from the data
    assignment = read_folds(out / "folds.csv")
    assert sorted(set(assignment.values())) == [-1, 0, 1]

    fold_dir = out / "fold0"
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "config.json"):
        assert (fold_dir / name).is_file(), name
    assert (fold_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(fold_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_dice_4", "val_dice_1", "lr", "seconds"} <= set(rows[0])
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])  # it learns something

    unet, ucfg, facts = load_fold(fold_dir / "best.pt")
    best_epoch = min(rows, key=lambda r: float(r["val_loss"]))["epoch"]
    assert facts.epoch == int(best_epoch) and facts.fold == 0
    assert facts.input_size == (64, 320) and facts.train_size == (32, 160)
    assert facts.mean == 0.0 and facts.std == 1.0 and facts.val_loss == pytest.approx(float(
        rows[int(best_epoch) - 1]["val_loss"]))
    assert ucfg.decoder_channels == (16, 8, 4)
    last = read_fold_checkpoint(fold_dir / "last.pt")
    assert last.facts.epoch == 2 and last.training["finished"] and "optimizer" in last.training
    assert read_fold_checkpoint(fold_dir / "best.pt").training is None

    # The checkpoint makes an inspection model as export will: full-size frames in, full-size masks out.
    meta = fold_metadata(facts, ucfg)
    masks, counts, present = InspectionModel([unet], meta)(torch.zeros(1, 64, 320, dtype=torch.uint8))
    assert masks.shape == (1, 4, 64, 320) and counts.dtype == torch.int32

    fold_config = json.loads((fold_dir / "config.json").read_text())
    assert fold_config["fold"] == 0
    assert fold_config["model"]["params_trainable"] == fold_config["model"]["params_total"] > 0
    # Balancing raised the rarest class's training records.
    data = fold_config["data"]
    assert min(data["class_counts_after_balancing"]) > min(data["class_counts_before_balancing"])
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["folds"][0]["best_epoch"] == int(best_epoch)
    assert "| 0 | 2 |" in (out / "report.md").read_text()


class Interrupted(Exception):
    pass


@pytest.mark.parametrize(("augment", "schedule"), [("none", "none"), ("strong", "cosine")])
def test_resume_after_interruption_continues_and_matches_an_uninterrupted_run(synth_dir: Path, tmp_path: Path,
                                                                              augment: str, schedule: str) -> None:
    """Also with random augmentation (its draws are seeded per (seed, fold, epoch, record)) and the
    cosine schedule (the learning rate is a function of the position in the run)."""
    torch.set_num_threads(1)
    cfg = tiny_config(synth_dir, epochs=3, augment=augment, lr_schedule=schedule)
    run_fit(cfg, options(tmp_path / "straight"))

    def stop_after_two(event: EpochEnd) -> None:
        if event.epoch == 2:
            raise Interrupted

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        run_fit(cfg, options(out), on_epoch_end=stop_after_two)
    metrics = out / "fold0" / "metrics.csv"
    assert [int(r["epoch"]) for r in read_metrics(metrics)] == [1, 2]
    assert read_fold_checkpoint(out / "fold0" / "last.pt").facts.epoch == 2
    # An epoch cut short after its metrics row but before last.pt: the row must be redone, not kept.
    with open(metrics, "a") as f:
        f.write("3,9,9,0,0,0,0,0,0,0,0,0,0,0.001,1\n")

    seen: list[int] = []
    run_fit(cfg, options(out), on_epoch_end=lambda e: seen.append(e.epoch))
    assert seen == [3]
    rows = read_metrics(metrics)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    straight_rows = read_metrics(tmp_path / "straight" / "fold0" / "metrics.csv")
    for column in ("train_loss", "val_loss", "val_dice"):
        assert [float(r[column]) for r in rows] == pytest.approx([float(r[column]) for r in straight_rows], rel=1e-6)
    resumed = load_checkpoint(out / "fold0" / "last.pt")["state_dict"]
    straight = load_checkpoint(tmp_path / "straight" / "fold0" / "last.pt")["state_dict"]
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)

    # A finished fold is skipped on the next call.
    seen.clear()
    run_fit(cfg, options(out), on_epoch_end=lambda e: seen.append(e.epoch))
    assert seen == []


def test_other_settings_are_refused_unless_restart(synth_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    run_fit(tiny_config(synth_dir, epochs=1), options(out))
    changed = tiny_config(synth_dir, epochs=1, lr=0.01)
    with pytest.raises(ValueError, match=r"(?s)other settings.*lr: 0\.001 -> 0\.01.*--restart"):
        run_fit(changed, options(out))
    (out / "fold0" / "keep.txt").write_text("x")
    run_fit(changed, options(out, restart=True))
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01
    assert not (out / "fold0" / "keep.txt").exists()
    assert len(read_metrics(out / "fold0" / "metrics.csv")) == 1


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fit_command.add_arguments(parser)
    return parser.parse_args(argv)


def test_device_flag_takes_what_engine_devices_accepts(synth_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``--device cuda:1`` is accepted as :func:`engine.devices.parse_device` accepts it (and refused
    at training time where no such GPU is); anything it refuses, the flag and a config file refuse."""
    from trainer.distributed import setup_distributed

    base = ["--data", str(synth_dir), "--out", str(tmp_path / "r"), "--encoder", "resnet18"]
    for text in ("cuda:1", "CUDA", "cpu", "auto"):
        _, opts = fit_command.config_from_args(_parse([*base, "--device", text]))
        assert opts.device == text.lower()
    with pytest.raises(SystemExit):
        _parse([*base, "--device", "gpu"])
    assert "--device must be auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
    config_file = tmp_path / "fit.yaml"
    config_file.write_text("device: cuda-1\n")
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
        fit_command.config_from_args(_parse([*base, "--config", str(config_file)]))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            setup_distributed("cuda:1")


def test_config_file_flags_precedence_and_unknown_keys(synth_dir: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "fit.yaml"
    config_file.write_text(f"data: [{synth_dir}]\nencoder: resnet18\nencoder-weights: none\nencoder_depth: 3\n"
                           "lr: 0.005\nepochs: 7\npos_weight: [2, 2, 1, 1.5]\nworkers: 0\n")
    cfg, opts = fit_command.config_from_args(_parse(["--config", str(config_file), "--out", str(tmp_path / "r"),
                                                    "--epochs", "3", "--no-balance"]))
    assert cfg.optim.lr == 0.005 and cfg.optim.epochs == 3 and cfg.balance is False  # flags beat the file
    assert cfg.optim.pos_weight == (2.0, 2.0, 1.0, 1.5) and cfg.network.decoder_channels == (256, 128, 64)
    assert cfg.optim.patience == 15 and opts.workers == 0 and opts.out == str(tmp_path / "r")

    config_file.write_text("encoder: resnet18\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"fit\.yaml: unknown key 'learning_rate'"):
        read_config_file(config_file)
    config_file.write_text("epochs: many\n")
    with pytest.raises(ValueError, match=r"epochs='many'"):
        read_config_file(config_file)


def test_cosine_schedule_warms_up_over_the_first_epoch_then_decays_to_zero() -> None:
    from trainer.loop import cosine_lr

    lrs = [cosine_lr(0.01, epoch, step, 4, 5) for epoch in range(1, 6) for step in range(4)]
    assert lrs[0] == pytest.approx(0.001) and lrs[3] == pytest.approx(0.001 + 0.009 * 3 / 4)
    assert lrs[4] == pytest.approx(0.01)  # the peak at the start of epoch 2
    decay = lrs[4:]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] < 0.0003
    assert cosine_lr(0.01, 9, 0, 4, 5) == 0.0  # past the planned epochs: stays at the end
    assert cosine_lr(0.01, 1, 0, 4, 1) == pytest.approx(0.01)  # one epoch: no warm-up


def test_impossible_combinations_name_the_flags(synth_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"--crop-defect-p must be in \[0, 1\], got 1\.5"):
        tiny_config(synth_dir, crop_defect_p=1.5)
    with pytest.raises(ValueError, match=r"--scale 0\.001 shrinks 64x320 frames to 0x0"):
        tiny_config(synth_dir, scale=0.001)
    with pytest.raises(ValueError, match=r"--pos-weight needs 4 positive numbers"):
        tiny_config(synth_dir, pos_weight=(1.0, 2.0))
    with pytest.raises(ValueError, match=r"--fold 5 is out of range"):
        run_fit(tiny_config(synth_dir), FitOptions(out="unused", fold=5))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pretrained_weights_offline_stop_with_advice(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"cannot be reached.*--encoder-weights none"):
        check_pretrained_reachable("resnet18", endpoint=f"http://127.0.0.1:{_closed_port()}",
                                   cache_dir=str(tmp_path / "empty-cache"))


def test_cli_fit_with_unreachable_weights_prints_one_error_line(
    synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants as hf

    from trainer.cli import main

    monkeypatch.setattr(hf, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    rc = main(["fit", "--data", str(synth_dir), "--out", str(tmp_path / "run"), "--encoder", "resnet18",
               "--encoder-weights", "imagenet", "--encoder-depth", "3", "--folds", "2", "--epochs", "1",
               "--device", "cpu", "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "trainer fit: error: --encoder-weights imagenet" in err and "Traceback" not in err


def test_training_frames_match_the_graph_input(synth_dir: Path) -> None:
    """Training scales each record once (TrainingFrames) and normalises it with scaled_input: the
    network sees what network.processing.preprocess, the exported graph's first step, makes of the frame."""
    from network.processing import preprocess, scaled_input
    from trainer.data import SeverstalDataset, TrainingFrames, load_samples

    cfg = tiny_config(synth_dir, mean=0.3, std=0.2)
    meta = cfg.metadata()
    data_cfg = cfg.frames
    samples = load_samples(synth_dir, data_cfg)[:2]
    frames = torch.stack([SeverstalDataset(samples, data_cfg)[i][0] for i in range(2)])
    full = [SeverstalDataset(samples, data_cfg)[i][1] for i in range(2)]
    x = preprocess(frames, meta)
    expected = torch.nn.functional.avg_pool2d((frames.float()[:, None] / 255 - 0.3) / 0.2, 2)
    assert x.shape == (2, 1, 32, 160)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    scaled = TrainingFrames(samples, data_cfg, cfg.train_size)
    pairs = [scaled[i] for i in range(2)]
    torch.testing.assert_close(scaled_input(torch.stack([p[0] for p in pairs]), meta), x, rtol=0, atol=1e-5)
    for (_, masks), truth in zip(pairs, full):
        assert masks.dtype == torch.uint8 and masks.shape == (cfg.frames.num_classes, 32, 160)
        assert torch.equal(masks, downscale_masks(truth[None], (32, 160))[0].to(torch.uint8))
    # The second read comes from the cache, and handing it out does not expose the cached tensors.
    again = scaled[0][0]
    again += 1
    assert torch.equal(scaled[0][0], pairs[0][0])
    assert dataclasses.asdict(meta)["train_height"] == 32 and np.isclose(meta.mean, 0.3)
    uncached = TrainingFrames(samples, data_cfg, cfg.train_size, cache_bytes=0)
    assert torch.equal(uncached[1][0], pairs[1][0]) and not uncached._cache


@pytest.mark.gpu
def test_cuda_fit_with_bf16_autocast_and_channels_last(synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    outcomes = run_fit(tiny_config(synth_dir, epochs=1), options(out, device="cuda"))
    assert outcomes[0].epochs_run == 1
    rows = read_metrics(out / "fold0" / "metrics.csv")
    assert np.isfinite(float(rows[0]["train_loss"])) and np.isfinite(float(rows[0]["val_loss"]))
    state = load_checkpoint(out / "fold0" / "best.pt")["state_dict"]
    # Mixed precision changes the arithmetic, not the weights: checkpoints stay float32 on the CPU.
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values() if v.is_floating_point())
    assert json.loads((out / "fold0" / "config.json").read_text())["options"]["device"] == "cuda:0"


def test_cpu_fit_with_bf16_autocast_and_channels_last(synth_dir: Path, tmp_path: Path, bf16_on) -> None:
    """--amp with bf16 on (native here or emulated by torch): the U-Net runs in bf16 (channels_last),
    losses and checkpoints stay fp32; --no-amp trains in fp32, and the two differ (so bf16 really ran)."""
    from trainer.loop import amp_dtype

    assert amp_dtype(on_cuda=False, amp=True) == torch.bfloat16
    assert amp_dtype(on_cuda=False, amp=False) is None
    # The default: off on CPUs (bf16 training has not matched fp32 there yet), whatever the CPU has.
    assert amp_dtype(on_cuda=False, amp=None) is None and FitSettings().amp is None
    torch.set_num_threads(1)
    runs = {}
    for amp in (True, False):
        out = tmp_path / f"amp-{amp}"
        run_fit(tiny_config(synth_dir, epochs=1, amp=amp), options(out))
        rows = read_metrics(out / "fold0" / "metrics.csv")
        assert np.isfinite(float(rows[0]["train_loss"])) and np.isfinite(float(rows[0]["val_loss"]))
        state = load_checkpoint(out / "fold0" / "last.pt")["state_dict"]
        assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
        runs[amp] = state
    assert any(not torch.equal(runs[True][k], runs[False][k]) for k in runs[True] if runs[True][k].is_floating_point())


def test_output_prior_initialisation_matches_the_defect_pixel_fraction(synth_dir: Path) -> None:
    from trainer.data import load_samples, sample_masks

    cfg = tiny_config(synth_dir)
    samples = load_samples(synth_dir, cfg.frames)
    priors = class_pixel_priors(samples, cfg.frames)
    masks = np.stack([sample_masks(s, cfg.frames) for s in samples])
    expected = np.clip(masks.mean(axis=(0, 2, 3)), 1e-4, 0.5)
    assert priors == pytest.approx(expected.tolist(), rel=1e-9)

    unet = loop.build_model(cfg, pretrained=False)
    init_output_prior(unet, priors)
    with torch.no_grad():
        probs = torch.sigmoid(unet.segmentation_head[0].bias)
    assert probs.tolist() == pytest.approx(priors, rel=1e-5)


def test_fold_training_steps_one_by_one(synth_dir: Path, tmp_path: Path) -> None:
    """The units train_fold is made of: set-up, loaders, validate, one epoch, save, restore."""
    from trainer.data import load_samples
    from trainer.distributed import setup_distributed
    from trainer.fit import read_resume, split_fold
    from trainer.loop import FoldTrainer
    from trainer.rundir import FoldPaths
    from trainer.splits import make_folds

    torch.set_num_threads(1)
    cfg = tiny_config(synth_dir, balance=False)
    opts = options(tmp_path / "run")
    samples = load_samples(synth_dir, cfg.frames)
    assignment = make_folds(samples, 4, folds=2, holdout=0.15, seed=0)
    train, val = split_fold(samples, assignment, 0)
    assert {s.image_id for s in train}.isdisjoint({s.image_id for s in val}) and all(
        assignment[s.image_id] == 0 for s in val)
    paths = FoldPaths.of(opts.out, 0)
    d = setup_distributed("cpu")
    trainer = FoldTrainer(cfg, opts, d, 0, paths, train, val)
    trainer.make_loaders()
    assert json.loads(paths.config.read_text())["data"]["val_images"] == len(val)
    before = trainer.summarise(trainer.validate())
    sums = trainer.validate()
    assert int(sums[1]) == len(val)  # every validation image once
    weights = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    assert int(trainer.train_epoch(1)[1]) == len(train)
    assert any(not torch.equal(weights[k], v) for k, v in trainer.unet.state_dict().items() if v.is_floating_point())
    assert trainer.summarise(trainer.validate()) != before
    assert read_resume(paths) is None
    row, finished = trainer.run_epoch(2)
    assert row["epoch"] == 2 and finished  # epochs=2
    checkpoint, state = read_resume(paths)
    assert checkpoint.facts.epoch == 2 and state.finished and state.best_epoch == trainer.stopping.best_epoch

    again = FoldTrainer(cfg, opts, d, 0, paths, train, val, fresh=False)
    again.restore(checkpoint, state)
    assert again.start_epoch == 3 and again.stopping == trainer.stopping
    for key, value in trainer.unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[key], value), key


def test_augment_is_recorded_and_changes_what_training_sees(synth_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    losses = {}
    for level in ("none", "strong"):
        out = tmp_path / level
        run_fit(tiny_config(synth_dir, epochs=1, augment=level), options(out))
        assert json.loads((out / "config.json").read_text())["augment"] == level
        assert json.loads((out / "fold0" / "config.json").read_text())["config"]["augment"] == level
        losses[level] = float(read_metrics(out / "fold0" / "metrics.csv")[0]["train_loss"])
    assert losses["none"] != losses["strong"]  # same seed and weights: only the batches differ
    # A run made before --augment existed (its config.json lacks the key) still resumes.
    saved = json.loads((tmp_path / "none" / "config.json").read_text())
    del saved["augment"]
    assert differences(saved, tiny_config(synth_dir, epochs=1)) == []
    assert differences(saved, tiny_config(synth_dir, epochs=1, augment="light")) == [
        "augment: '<absent>' -> 'light'"]


def test_config_json_of_a_run_made_before_the_composed_config_reads_and_writes_back_unchanged() -> None:
    """RUN/config.json stays flat: the composed FitConfig reads an old run's file and writes the same keys
    and values; an unknown key is still an error naming it and the file."""
    path = Path(__file__).parent / "fixtures" / "run_before_move" / "run" / "config.json"
    saved = json.loads(path.read_text())
    cfg = FitConfig.from_dict(saved, str(path))
    assert cfg.network.encoder == "resnet18" and cfg.network.decoder_channels == (4,)
    assert cfg.frames.size == (64, 320) and cfg.optim.batch_size == 4 and cfg.train_size == (32, 160)
    assert cfg.to_dict() == saved and differences(saved, cfg) == []
    with pytest.raises(ValueError, match=r"config\.json: unknown key 'learning_rate'"):
        FitConfig.from_dict({**saved, "learning_rate": 0.1}, str(path))
    with pytest.raises(ValueError, match="decoder_channels has 2 entries"):  # the network's record checks it
        FitConfig.from_dict({**saved, "decoder_channels": [4, 4]}, str(path))
