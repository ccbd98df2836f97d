"""DistributedDataParallel training with the gloo backend: 2 CPU processes, as torchrun would start them."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from network.checkpoint import load_checkpoint
from trainer.config import FitOptions, FitSettings, resolve
from trainer.fit import EpochEnd, run_fit
from trainer.rundir import read_metrics

WORLD = 2
EPOCHS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, data: str, out: str, dumps: str, budget_min: float | None = None) -> None:
    """One torchrun-style process: the environment torchrun would set, then the library entry point."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    epochs = EPOCHS if budget_min is None else 50
    cfg = resolve(FitSettings(data=[data], encoder="resnet18", encoder_weights="none", encoder_depth=3,
                            decoder_channels=(16, 8, 4), folds=2, holdout=0.15, epochs=epochs, patience=epochs,
                            batch_size=4, budget_min=budget_min))

    def dump(event: EpochEnd) -> None:
        state = {k: v.detach().clone() for k, v in event.unet.state_dict().items()}
        torch.save({"state": state, "row": event.row}, Path(dumps) / f"rank{event.rank}-epoch{event.epoch}.pt")

    run_fit(cfg, FitOptions(out=out, fold=0, device="cpu", workers=0, progress=False), on_epoch_end=dump)


def test_ddp_gloo_two_processes_keep_identical_weights_and_write_once(synth_dir: Path, tmp_path: Path) -> None:
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    dumps.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(synth_dir), str(out), str(dumps)), nprocs=WORLD, join=True)

    for epoch in range(1, EPOCHS + 1):
        rank0 = torch.load(dumps / f"rank0-epoch{epoch}.pt")
        rank1 = torch.load(dumps / f"rank1-epoch{epoch}.pt")
        # Gradients were averaged across the processes: after every step both hold the same weights,
        # although each trained on its own half of the epoch.
        for key, value in rank0["state"].items():
            if value.is_floating_point():
                torch.testing.assert_close(rank1["state"][key], value, rtol=0, atol=1e-6, msg=key)
        # Losses and Dice were summed over both processes' shares, so both ranks decide alike.
        assert rank0["row"]["val_loss"] == rank1["row"]["val_loss"]
        assert rank0["row"]["train_loss"] == rank1["row"]["train_loss"]
    first = torch.load(dumps / "rank0-epoch1.pt")["state"]
    second = torch.load(dumps / f"rank0-epoch{EPOCHS}.pt")["state"]
    assert any(not torch.equal(first[k], second[k]) for k in first if first[k].is_floating_point())
    # Rank 0 alone wrote the files: one row per epoch, and its checkpoint is the shared weights.
    rows = read_metrics(out / "fold0" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    last = load_checkpoint(out / "fold0" / "last.pt")
    final = torch.load(dumps / f"rank1-epoch{EPOCHS}.pt")["state"]
    for key, value in last["state_dict"].items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=1e-6, msg=key)
    assert json.loads((out / "fold0" / "config.json").read_text())["options"]["world_size"] == WORLD


def test_ddp_ranks_follow_rank_zeros_budget(synth_dir: Path, tmp_path: Path) -> None:
    """--budget-min under DDP: each rank's clock differs, so rank 0's decides the schedule's length and the
    end for all; otherwise the ranks would train at different learning rates or one would wait forever."""
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    dumps.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(synth_dir), str(out), str(dumps), 0.05), nprocs=WORLD, join=True)
    epochs = [sorted(int(p.stem.split("epoch")[1]) for p in dumps.glob(f"rank{r}-*.pt")) for r in range(WORLD)]
    assert epochs[0] == epochs[1] and 1 <= len(epochs[0]) < 50
    last = epochs[0][-1]
    rank0 = torch.load(dumps / f"rank0-epoch{last}.pt")
    rank1 = torch.load(dumps / f"rank1-epoch{last}.pt")
    assert rank0["row"]["lr"] == rank1["row"]["lr"]
    for key, value in rank0["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(rank1["state"][key], value, rtol=0, atol=1e-6, msg=key)
