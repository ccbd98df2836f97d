"""``server client`` (the CLI in-process, against a server on its own thread) and the folder
streamer's library (``client.stream_folder``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cv2
import numpy as np

from tests.server.conftest import ServerThread, running_server
from tests.server.test_service import assert_equals_direct, assert_has_defects


def write_images(folder: Path, frames: np.ndarray) -> list[str]:
    folder.mkdir()
    names = [f"{i:04d}.png" for i in range(len(frames))]
    for name, frame in zip(names, frames):
        cv2.imwrite(str(folder / name), frame)
    return names


def test_client_csv_is_the_models_answer_and_scores_like_it(defect_onnx, direct_backend, tmp_path, capsys):
    """The CSV of a labelled (synthetic Severstal-format) folder reads back through the trainer's CSV
    reader as the backend's own gated masks, and the trainer's metrics score it exactly as they
    score the backend's direct output against the same labels."""
    from engine.rle import decode_many
    from server.cli import main
    from trainer.data import DataConfig, load_samples, read_annotations, read_image, sample_masks
    from trainer.metrics import mask_stats, score
    from trainer.synth import synthesize

    data = synthesize(tmp_path / "data", images=16, height=64, width=320, seed=3)
    cfg = DataConfig(height=64, width=320)
    samples = load_samples(data, cfg)
    out = tmp_path / "results.csv"
    with ServerThread(defect_onnx) as server:
        code = main(["client", "--target", server.address, "--images", str(data), "--streams", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "16 of 16 frames inspected" in err

    frames = np.stack([read_image(s.path, cfg) for s in samples])  # how training and evaluation read them
    direct = direct_backend.infer(frames)
    rles = direct.rle()
    predicted = read_annotations(out, num_classes=4, height=64, width=320)
    assert sorted(predicted) == [s.image_id for s in samples]  # every image listed, defect-free ones too
    for i, s in enumerate(samples):
        assert predicted[s.image_id] == [r if p else "" for r, p in zip(rles[i], direct.present[i])]

    truth = np.stack([sample_masks(s, cfg) for s in samples])
    csv_masks = np.stack([decode_many(predicted[s.image_id], 64, 320) for s in samples])
    from_csv = score(mask_stats(csv_masks, truth, present=csv_masks.any(axis=(2, 3))))
    from_model = score(mask_stats(direct.masks, truth, present=direct.present))
    assert from_csv.kaggle == from_model.kaggle
    assert from_csv.label_accuracy == from_model.label_accuracy
    assert from_csv.confusion == from_model.confusion
    assert direct.present.any() and truth.any()


def test_client_library_raw_frames(defect_onnx, camera_frames, direct_output, tmp_path):
    from client.stream_folder import list_images, run_cameras

    names = write_images(tmp_path / "images", camera_frames[:12])

    async def main():
        async with running_server(defect_onnx) as server:
            return await run_cameras(server.address, list_images(tmp_path / "images"), streams=5, raw=True, fps=100)

    run = asyncio.run(main())
    assert run.model_info.input_width == 320 and not run.unanswered and not run.failed
    assert [a.image_id for a in sorted(run.answers, key=lambda a: a.image_id)] == names
    for answer in run.answers:
        i = names.index(answer.image_id)
        assert answer.camera_id == f"cam{i % 5}" and answer.frame_id == i // 5
        assert_equals_direct(answer.response, direct_output, i)
    assert_has_defects([a.response for a in run.answers])


def test_client_lists_failed_frames_and_exits_1(tiny_onnx, camera_frames, tmp_path, capsys):
    from server.cli import main

    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "good.png"), camera_frames[0])
    cv2.imwrite(str(images / "small.png"), np.zeros((10, 10), np.uint8))
    out = tmp_path / "results.csv"
    with ServerThread(tiny_onnx) as server:
        code = main(["client", "--target", server.address, "--images", str(images), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "1 of 2 frames inspected" in err
    assert "failed small.png: camera 'cam1' frame 0: PNG image is 10x10" in err
    assert {line.split(",")[0] for line in out.read_text().splitlines()[1:]} == {"good.png"}


def test_client_reports_an_unreachable_server(camera_frames, tmp_path, capsys):
    import socket

    from server.cli import main

    write_images(tmp_path / "images", camera_frames[:1])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["client", "--target", f"127.0.0.1:{port}", "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "r.csv"), "--connect-timeout", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot reach an inspection server at 127.0.0.1:{port}" in err and "Traceback" not in err
