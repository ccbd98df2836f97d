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


def test_client_streams_a_line_folder_with_coil_ids_and_positions(defect_onnx, tmp_path, capsys):
    """``server client --line``: one camera per camera of the folder, every frame answered, and every
    request the server inspected carried the frame's coil id and encoder position."""
    from coils.line_folder import read_frames
    from server.cli import main
    from tests.server.conftest import metric_samples
    from trainer.synth_line import LineSpec, synthesize_line

    folder = tmp_path / "line"
    synthesize_line(folder, LineSpec(cameras=2, frames=6, coils=2, height=64, width=320, overlap_px=32,
                                     image_format="png"))
    frames = read_frames(folder)
    seen: list[tuple] = []
    out = tmp_path / "results.csv"
    with ServerThread(defect_onnx) as server:
        server.batch_listeners.append(lambda batch: seen.extend(
            (r.camera_id, r.frame_id, r.coil_id, r.position_mm) for r in batch.sources))
        code = main(["client", "--target", server.address, "--line", str(folder), "--out", str(out)])
        from prometheus_client import generate_latest

        counted = metric_samples(generate_latest(server.metrics.registry).decode())
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"{len(frames)} of {len(frames)} frames inspected" in err and "over 2 streams" in err
    assert sorted(seen) == sorted((f.camera_id, f.frame_id, f.coil_id, f.position_mm) for f in frames)
    assert {f.coil_id for f in frames} == {"coil-0-000", "coil-0-001"} and len(frames) == 24
    assert counted[("inspection_coil_frames_total", ())] == len(frames)
    listed = {line.split(",")[0] for line in out.read_text().splitlines()[1:]}
    assert listed == {f.file for f in frames}  # every frame's file, answered


def test_client_line_names_a_missing_frame_file_and_frames_out_of_order(tmp_path, capsys):
    from server.cli import main
    from trainer.synth_line import LineSpec, synthesize_line

    folder = tmp_path / "line"
    synthesize_line(folder, LineSpec(cameras=1, frames=4, height=64, width=320, overlap_px=0))
    frames_csv = folder / "frames.csv"
    rows = frames_csv.read_text().splitlines()
    frames_csv.write_text("\n".join([rows[0], rows[2], rows[1], *rows[3:]]) + "\n")
    assert main(["client", "--target", "127.0.0.1:1", "--line", str(folder)]) == 2
    assert "camera cam0: frame 0 is listed after frame 1; each camera's frame ids must increase" in (
        capsys.readouterr().err)
    frames_csv.write_text("\n".join(rows) + "\n")
    (folder / "cam0" / "coil-0-000-00002.jpg").unlink()
    assert main(["client", "--target", "127.0.0.1:1", "--line", str(folder)]) == 2
    assert "frame cam0/2: no such file" in capsys.readouterr().err
