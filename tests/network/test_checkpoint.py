"""Fold checkpoints' typed facts: strict reading, and checkpoints written before the typed record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from network.build import build_unet
from network.checkpoint import (
    FOLD_FORMAT_V1,
    FoldCheckpoint,
    FoldFacts,
    load_ensemble,
    load_fold,
    read_fold_checkpoint,
)
from network.config import UNetConfig

FACTS = dict(fold=1, epoch=3, input_size=[64, 320], train_size=[32, 160], class_names=["a", "b", "c", "d"],
             mean=0.5, std=0.25)


def test_facts_round_trip_and_refuse_missing_or_unknown_keys() -> None:
    facts = FoldFacts.from_dict(FACTS)
    assert facts.input_size == (64, 320) and facts.class_names == ("a", "b", "c", "d") and facts.val_loss is None
    assert FoldFacts.from_dict(facts.to_dict()) == facts
    without = {k: v for k, v in FACTS.items() if k != "input_size"}
    with pytest.raises(ValueError, match=r"fold.pt: fold facts lacks input_size"):
        FoldFacts.from_dict(without, "fold.pt")
    with pytest.raises(ValueError, match=r"has unknown input_szie"):  # the misspelling that gave 256x1600
        FoldFacts.from_dict({**without, "input_szie": [64, 320]})
    with pytest.raises(ValueError, match="input_size must be"):
        FoldFacts.from_dict({**FACTS, "input_size": [64]})


def test_a_checkpoint_of_the_flat_layout_still_loads(tmp_path: Path) -> None:
    """What trainer fit wrote before the typed record (fold-checkpoint/1): facts and resume state flat."""
    cfg = UNetConfig(encoder="resnet18", encoder_depth=3, decoder_channels=(8, 8, 8))
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    path = tmp_path / "last.pt"
    torch.save({"format": FOLD_FORMAT_V1, "unet": cfg.to_dict(), "state_dict": unet.state_dict(), **FACTS,
                "val_loss": 0.25, "finished": True, "seconds": 1.5, "best_epoch": 3}, path)
    checkpoint = read_fold_checkpoint(path)
    assert checkpoint.facts == FoldFacts.from_dict({**FACTS, "val_loss": 0.25})
    assert checkpoint.training == {"best_epoch": 3, "finished": True, "seconds": 1.5}
    loaded, _, facts = load_fold(path)
    x = torch.rand(1, 1, 32, 160)
    with torch.no_grad():
        assert torch.equal(loaded(x), unet(x))
    _, _, meta = load_ensemble(path)
    assert meta.input_size == (64, 320) and meta.train_size == (32, 160) and meta.mean == 0.5
    torch.save({"format": FOLD_FORMAT_V1, "unet": cfg.to_dict(), "state_dict": unet.state_dict(),
                **{k: v for k, v in FACTS.items() if k != "train_size"}}, path)
    with pytest.raises(ValueError, match="lacks train_size"):
        load_fold(path)


def test_payload_layout_is_checked() -> None:
    good = FoldCheckpoint({"encoder": "resnet18"}, {}, FoldFacts.from_dict(FACTS)).to_payload()
    assert FoldCheckpoint.from_payload(good).facts.fold == 1
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        FoldCheckpoint.from_payload({**good, "extra": 1})
    with pytest.raises(ValueError, match="not a fold checkpoint"):
        FoldCheckpoint.from_payload({**good, "format": "strip-inspection/ensemble/1"})


def _pickled_globals(path: Path) -> set[str]:
    """The module of every class or function a torch checkpoint's pickle refers to."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    modules, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            modules.add(str(arg).split(" ")[0])
        elif op.name == "STACK_GLOBAL":
            modules.add(strings[-2])
    return modules


def test_checkpoints_pickle_no_class_of_ours(tmp_path: Path) -> None:
    """Fold checkpoints and bundles hold dicts tagged with a format string, never our classes, so
    moving or renaming a module (engine.model -> network.*) cannot stop an old file from loading."""
    from network.checkpoint import fold_metadata, save_ensemble, save_fold_checkpoint

    cfg = UNetConfig(encoder="resnet18", encoder_depth=1, decoder_channels=(8,), num_classes=4)
    unet = build_unet(cfg).eval()
    facts = FoldFacts.from_dict(FACTS)
    save_fold_checkpoint(tmp_path / "last.pt", cfg, unet, facts, training={"seconds": 1.0, "finished": False})
    save_ensemble(tmp_path / "model.pt", cfg, [unet], fold_metadata(facts, cfg))
    for name in ("last.pt", "model.pt"):
        modules = _pickled_globals(tmp_path / name)
        assert modules and all(m.split(".")[0] in ("collections", "torch", "builtins") for m in modules), modules
    assert load_fold(tmp_path / "last.pt")[1] == cfg and load_ensemble(tmp_path / "model.pt")[1] == cfg
