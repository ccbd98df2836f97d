"""``bench throughput`` on the tiny model: FLOP counts, the naive reference, the table/JSON/plot.

No timing is asserted: only that every figure is produced, consistent and well-formed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import cli
from benchmarks.pipeline import STAGES
from tests.fixtures import image_folder


def test_flops_counted_two_ways_agree(tiny_models: tuple[Path, Path]) -> None:
    from benchmarks.flops import count_flops_onnx, model_flops

    onnx, pt = tiny_models
    graph = count_flops_onnx(onnx)
    eager = model_flops(pt)
    assert eager is not None and "FlopCounterMode" in eager.method
    # Same convention (2 FLOPs per multiply-add, convolutions and matmuls only), counted
    # independently from the exported graph and from the eager folds: they must agree exactly.
    assert graph == eager.flops_per_image > 0


def test_onnx_flops_match_a_hand_count(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from benchmarks.flops import count_flops_onnx

    # x [N,3,8,10] -> Conv 4x3x3x3 pad 1 -> [N,4,8,10]: 2 * (4*8*10) * (3*3*3) FLOPs per image.
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.zeros(108, np.float32))],
    )
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph), path)
    assert count_flops_onnx(path) == 2 * 4 * 8 * 10 * 27


def test_naive_pipeline_equals_the_backends(tiny_models: tuple[Path, Path], tiny_frames: np.ndarray) -> None:
    from benchmarks.naive import NaivePipeline, agreement
    from engine.backends import load_backend
    from engine.rle import encode

    onnx, pt = tiny_models
    naive = NaivePipeline.from_file(pt)
    out = naive.run(tiny_frames)
    meta = naive.metadata
    assert set(out.stage_seconds) == {"h2d", "inference", "d2h", "postprocess_rle"}
    # The fixture's thresholds make some classes present and others absent: a real comparison.
    assert out.present.any() and not out.present.all()
    for path in (onnx, pt):
        with load_backend(path, device="cpu", backend="onnxruntime" if path == onnx else "torch",
                          precision="fp32") as backend:
            result = backend.infer(tiny_frames)
        # fp32 everywhere: only pixels within 1e-4 of a threshold may flip (batched vs per-image
        # convolutions and numpy vs torch sigmoid differ in the last bits).
        a = agreement(out, result, meta.thresholds, meta.min_areas, band=1e-4)
        assert a.equal, a
        np.testing.assert_array_equal(result.counts, out.counts)
        np.testing.assert_array_equal(result.present, out.present)
        np.testing.assert_array_equal(result.masks, out.masks)
        assert result.rle() == out.rles
    assert out.rles[0] == [encode(m) for m in out.masks[0]]


def test_agreement_detects_a_differing_pixel(tiny_models: tuple[Path, Path], tiny_frames: np.ndarray) -> None:
    from benchmarks.naive import NaivePipeline, agreement
    from engine.backends import InspectionResult

    naive = NaivePipeline.from_file(tiny_models[1])
    out = naive.run(tiny_frames[:2])
    meta = naive.metadata
    far = np.abs(out.probs - np.asarray(meta.thresholds).reshape(1, -1, 1, 1)) > 0.01
    i, k, y, x = (int(v[0]) for v in np.nonzero(far))
    masks = out.masks.copy()
    masks[i, k, y, x] ^= 1
    counts = out.counts.copy()
    counts[i, k] += masks[0, 0].size  # more than any (image, class) can hold near the threshold
    bad = InspectionResult(masks=masks, counts=counts, present=out.present.copy())
    a = agreement(out, bad, meta.thresholds, meta.min_areas, band=1e-4)
    assert not a.equal
    assert a.differing_pixels == 1 and a.count_violations >= 1


def test_naive_needs_a_pt(tiny_models: tuple[Path, Path]) -> None:
    from benchmarks.naive import NaivePipeline

    with pytest.raises(ValueError, match=r"model\.onnx: the naive pipeline runs torch eager and needs a \.pt"):
        NaivePipeline.from_file(tiny_models[0])


def test_throughput_writes_table_json_and_plot(
    tiny_models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx, pt = tiny_models
    out_json, out_png = tmp_path / "t.json", tmp_path / "t.png"
    rc = cli.main(
        ["throughput", "--model", str(onnx), "--model", str(pt), "--batch-sizes", "1,2", "--frames", "2",
         "--min-repeats", "2", "--naive-frames", "2", "--peak-seconds", "0.05", "--peak-size", "256",
         "--threads", "1", "--json", str(out_json), "--backends", "onnxruntime-graph,onnxruntime,torch,naive",
         "--plot", str(out_png)]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    for title in ("img/s", "ms/batch p50", "p95", "decode ms", "H2D ms", "infer ms", "post+RLE ms", "D2H ms",
                  "U-Net ms", "post % infer", "post floor ms", "GFLOP/s", "% peak", "x naive",
                  "post-processing floor:", "memory bandwidth:"):
        assert title in stdout
    assert "| naive | model.pt | cpu | fp32 | 1 (per image) |" in stdout
    assert "outputs equal to the naive pipeline's" in stdout

    report = json.loads(out_json.read_text())
    machine = report["machine"]
    assert machine["cpu"] and machine["cpus_usable"] >= 1 and machine["libraries"]["onnxruntime"]
    assert machine["git"]["commit"]
    assert report["peaks"][0]["device"] == "cpu" and report["peaks"][0]["flops_per_s"] > 0
    rows = report["rows"]
    assert sorted({(r["backend"], r["batch_size"]) for r in rows}) == [
        ("naive", 1), ("onnxruntime", 1), ("onnxruntime", 2), ("onnxruntime-graph", 1), ("onnxruntime-graph", 2),
        ("torch", 1), ("torch", 2)
    ]
    assert report["memory_bandwidth"]["bytes_per_s"] > 0
    floor = next(m for m in report["models"] if m["file"] == "model.onnx")["post_floor"]
    assert floor["compares"] == 4 * 64 * 320 and floor["seconds"] > 0
    for r in rows:
        if r["backend"].startswith("onnxruntime"):  # the network part timed alone (the graph row: by its twin)
            infer = 1000 * np.median(r["stage_seconds"]["inference"])
            assert r["network_ms"] > 0 and r["post_ms"] == pytest.approx(max(0.0, infer - r["network_ms"]))
            assert 0 <= r["post_share"] < 1
            assert r["post_floor_ms"] == pytest.approx(1000 * floor["seconds"] * r["batch_size"])
        else:
            assert r["network_ms"] is None and r["post_share"] is None
    flops = {m["file"]: m["flops"]["flops_per_image"] for m in report["models"]}
    assert flops["model.onnx"] == flops["model.pt"] > 0
    for r in rows:
        assert set(r["stage_ms_median"]) == set(STAGES)
        assert r["stage_ms_median"]["h2d"] is None and r["stage_ms_median"]["d2h"] is None  # CPU: n/a
        assert r["repeats"] == len(r["total_seconds"]) >= 2
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / np.median(r["total_seconds"]))
        assert r["ms_per_batch_p95"] >= r["ms_per_batch_median"] > 0
        # The stages are parts of the timed batch: their medians cannot exceed its largest total.
        parts = [r["stage_ms_median"][s] for s in ("decode", "inference", "postprocess_rle")]
        assert all(p > 0 for p in parts) and max(parts) <= 1000 * max(r["total_seconds"])
        assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_image"] * r["inference_images_per_s"])
        assert 0 < r["peak_fraction"]
        assert r["speedup_vs_naive"] > 0
    assert [c["equal"] for c in report["naive_agreement"]] == [True, True, True]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_model_is_built_once_and_reused(tmp_path: Path) -> None:
    from benchmarks.models import BenchModelSpec, ensure_model
    from engine.backends import load_backend
    from toolchain.parity import synthetic_frames

    spec = BenchModelSpec(decoder_channels=(16, 8, 4), height=64, width=320, train_height=32, train_width=160,
                          defect_fraction=0.01, fit_steps=0)
    built = ensure_model(spec, tmp_path)
    stamps = [p.stat().st_mtime_ns for p in built.files()]
    again = ensure_model(spec, tmp_path)
    assert again.onnx == built.onnx and [p.stat().st_mtime_ns for p in again.files()] == stamps
    with load_backend(built.onnx, device="cpu") as backend:
        meta = backend.metadata
        # Thresholds were calibrated on these frames to leave defect_fraction of pixels above them.
        masks = backend.infer(synthetic_frames(2, 64, 320, seed=spec.seed + 1)).masks
    assert list(meta.min_areas) == list(spec.min_areas) and meta.encoder == "resnet18"
    fraction = masks.mean(axis=(0, 2, 3))
    assert np.all(np.abs(fraction - 0.01) < 0.005), fraction
    other = BenchModelSpec(**{**spec.__dict__, "folds": 2})
    assert other.name != spec.name and other.key() != spec.key()


def test_fitted_model_is_trained_and_thresholded_at_one_half(tmp_path: Path) -> None:
    """The default bench model's weights are fitted to synthetic strips: they move from their random start, the
    loss falls, and the thresholds are the thesis' 0.5 rather than a calibrated quantile."""
    import torch

    from benchmarks.fit import fit_unet
    from benchmarks.models import BenchModelSpec, ensure_model
    from engine.backends import load_backend
    from network.build import build_unet
    from network.config import UNetConfig
    from trainer.losses import SegmentationLoss
    from trainer.synth import draw_frame

    spec = BenchModelSpec(decoder_channels=(16, 8, 4), height=64, width=320, train_height=32, train_width=160,
                          fit_steps=30)
    assert spec.name.endswith("-fit30") and BenchModelSpec(**{**spec.__dict__, "fit_steps": 0}).name != spec.name
    cfg = UNetConfig(encoder=spec.encoder, encoder_depth=3, decoder_channels=spec.decoder_channels)
    torch.manual_seed(0)
    unet = build_unet(cfg)
    start = {k: v.clone() for k, v in unet.state_dict().items()}
    rng = np.random.default_rng(7)
    held_out = [draw_frame(rng, 32, 160, (k,), 4) for k in range(4)]
    x = torch.from_numpy(np.stack([i for i, _ in held_out])[:, None].astype(np.float32) / 255.0)
    y = torch.from_numpy(np.stack([m for _, m in held_out]))

    def loss() -> float:
        with torch.no_grad():
            return float(SegmentationLoss("bce+dice")(unet.eval()(x), y))

    before = loss()
    fit_unet(unet, spec.fit_steps, (spec.height, spec.width), (spec.train_height, spec.train_width), seed=0)
    assert not unet.training
    assert any(not torch.equal(start[k], v) for k, v in unet.state_dict().items())
    assert loss() < 0.9 * before
    built = ensure_model(spec, tmp_path)
    with load_backend(built.onnx, device="cpu") as backend:
        assert list(backend.metadata.thresholds) == [0.5] * 4
    with pytest.raises(ValueError, match="fit_steps must be >= 0"):
        BenchModelSpec(fit_steps=-1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backends", "onnxruntime,tflite"], "--backends: unknown backend(s) ['tflite']"),
        (["--batch-sizes", "1,x"], "--batch-sizes must be comma-separated integers"),
        (["--batch-sizes", "0"], "--batch-sizes must be positive"),
        (["--model", "missing.onnx"], "--model missing.onnx: no such file"),
        (["--check-data", "missing-folder"], "--check-data missing-folder: no such folder"),
        (["--check-data", ".", "--check-frames", "0"], "--check-data needs --check-frames >= 1"),
    ],
)
def test_bad_flags_are_clear_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["throughput", *argv]) == 2
    assert message in capsys.readouterr().err


def test_nothing_to_measure_is_an_error(tiny_models: tuple[Path, Path], capsys) -> None:
    assert cli.main(["throughput", "--model", str(tiny_models[0]), "--backends", "torch"]) == 2
    assert "nothing to measure: no model file suits --backends torch (models: model.onnx" in capsys.readouterr().err


def test_cuda_backends_without_cuda_are_refused(tiny_models: tuple[Path, Path], capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["throughput", "--model", str(tiny_models[1]), "--backends", "torch-cuda-fp16"]) == 2
    assert "torch sees no CUDA GPU here" in capsys.readouterr().err


def test_peak_measurement_reports_what_it_measured() -> None:
    import torch

    from benchmarks.flops import measure_peak_flops

    peak = measure_peak_flops("cpu", "float32", size=128, seconds=0.01)
    assert peak.size == 128 and peak.repeats >= 3 and peak.threads == torch.get_num_threads()
    assert peak.flops_per_s >= peak.median_flops_per_s > 0
    before = torch.backends.cuda.matmul.allow_tf32
    tf32 = measure_peak_flops("cpu", "tf32", size=128, seconds=0.01)
    assert tf32.dtype == "tf32" and torch.backends.cuda.matmul.allow_tf32 == before


def test_reduced_precision_rows_are_held_to_the_peak_of_their_own_precision(
    tiny_models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], native_bf16
) -> None:
    """The default backends on the tiny model plus its int8 IR: OpenVINO fp32/bf16/int8 and torch bf16 rows,
    a peak per precision (fp32, bf16, int8), each row's % peak against its own, the CPU feature line."""
    pytest.importorskip("openvino", reason="openvino is not installed")
    pytest.importorskip("nncf", reason="nncf is not installed")
    from engine.cpu import cpu_features
    from toolchain.build_openvino import build_openvino
    from toolchain.parity import synthetic_frames

    onnx, pt = tiny_models
    ir = tmp_path / "model_int8.xml"
    build_openvino(onnx, ir, "int8", calibration=synthetic_frames(24, 64, 320, seed=3), calibration_frames=16,
                   parity_frames=8)
    out_json = tmp_path / "t.json"
    rc = cli.main(
        ["throughput", "--model", str(onnx), "--model", str(pt), "--model", str(ir), "--batch-sizes", "2",
         "--frames", "2", "--min-repeats", "1", "--naive-frames", "1", "--peak-seconds", "0.02", "--peak-size", "256",
         "--threads", "1", "--json", str(out_json), "--plot", str(tmp_path / "t.png")]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert cpu_features().line() in stdout and "AMX-BF16" in stdout
    report = json.loads(out_json.read_text())
    peaks = {p["dtype"]: p for p in report["peaks"]}
    assert set(peaks) == {"float32", "bfloat16", "int8"} and all(p["flops_per_s"] > 0 for p in peaks.values())
    by_precision = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}
    rows = {(r["backend"], r["precision"]) for r in report["rows"]}
    assert {("openvino-fp32", "fp32"), ("openvino-bf16", "bf16"), ("openvino-int8", "int8"),
            ("torch-bf16", "bf16"), ("onnxruntime", "fp32"), ("torch", "fp32")} <= rows
    for r in report["rows"]:
        assert r["peak_flops_per_s"] == peaks[by_precision[r["precision"]]]["flops_per_s"], r["backend"]
    agreement = {c["backend"]: c["equal"] for c in report["naive_agreement"]}
    assert agreement["openvino-fp32"] and agreement["openvino-bf16"] and agreement["torch-bf16"]


def test_a_given_onnx_gets_an_int8_row_where_its_int8_ir_sits_beside_it(tiny_int8: Path, tiny_models: tuple[Path, Path]
                                                                        ) -> None:
    """``bench throughput --model model.onnx`` adds the ``model.int8.xml`` beside it (the openvino-int8 row),
    and notes, for a model without one, how to build it; without openvino-int8 asked for, nothing is added."""
    from benchmarks.throughput import ThroughputConfig, resolve_models

    onnx, _ = tiny_models
    notes: list[str] = []
    cfg = ThroughputConfig(models=[tiny_int8, onnx], backends=("onnxruntime", "openvino-int8"))
    models, _, _ = resolve_models(cfg, notes)
    assert models == [tiny_int8, onnx, tiny_int8.with_name("model.int8.xml")]
    assert len(notes) == 1 and f"no row for {onnx.name}: no int8 IR model.int8.xml beside" in notes[0]
    assert "engine build --target openvino --precision int8" in notes[0]
    cfg = ThroughputConfig(models=[tiny_int8], backends=("onnxruntime",))
    assert resolve_models(cfg, [])[0] == [tiny_int8]


def _throughput_argv(onnx: Path, pt: Path, tmp_path: Path, *extra: str) -> list[str]:
    """The fastest ``bench throughput`` run with a naive check: one ONNX Runtime row, batch 1."""
    return ["throughput", "--model", str(onnx), "--model", str(pt), "--backends", "onnxruntime,naive",
            "--batch-sizes", "1", "--frames", "1", "--min-repeats", "1", "--naive-frames", "1", "--warmup", "0",
            "--peak-seconds", "0.05", "--peak-size", "128", "--threads", "1", "--json", str(tmp_path / "t.json"),
            "--plot", str(tmp_path / "t.png"), *extra]


def test_check_data_runs_the_check_on_the_folders_first_images(
    tiny_models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.naive import NaivePipeline
    from benchmarks.naivecheck import check_frames
    from benchmarks.pipeline import jpeg_frames
    from toolchain.build_openvino import read_frames

    onnx, pt = tiny_models
    folder = image_folder(tmp_path / "held", {name: (64, 320) for name in ("c.png", "a.png", "d.png", "b.png")})
    assert cli.main(_throughput_argv(onnx, pt, tmp_path, "--check-data", str(folder), "--check-frames", "3")) == 0
    stdout = capsys.readouterr().out
    assert f"on --check-data {folder} with 3 images (a.png, b.png, c.png); timings on the synthetic pool" in stdout
    assert f"onnxruntime (model.onnx): outputs equal to the naive pipeline's on 3 frames of --check-data {folder}" \
        in stdout

    report = json.loads((tmp_path / "t.json").read_text())
    assert report["config"]["check_data"] == str(folder)
    check = report["naive_check"]
    assert (check["source"], check["frames"], check["files"]) == (str(folder), 3, ["a.png", "b.png", "c.png"])
    # The naive outputs recorded are those of the folder's images, not of the synthetic pool's frames.
    naive = NaivePipeline.from_file(pt)
    files = [folder / "train_images" / name for name in check["files"]]
    assert check["naive_counts"] == naive.run(read_frames(files, naive.metadata.input_size)).counts.tolist()
    pool = check_frames(None, 3, jpeg_frames(3, 64, 320), naive.metadata)
    assert check["naive_counts"] != naive.run(pool.frames).counts.tolist()
    assert [(c["backend"], c["frames"], c["source"], c["equal"]) for c in report["naive_agreement"]] == [
        ("onnxruntime", 3, str(folder), True)]


def test_check_data_of_another_size_is_refused_naming_the_file(
    tiny_models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx, pt = tiny_models
    folder = image_folder(tmp_path / "held", {"a.png": (64, 320), "b.png": (32, 160)})
    assert cli.main(_throughput_argv(onnx, pt, tmp_path, "--check-data", str(folder))) == 2
    err = capsys.readouterr().err
    assert f"--check-data {folder}: {folder / 'train_images' / 'b.png'}: 32x160 frame, the model takes 64x320" in err
    assert not (tmp_path / "t.json").exists()


def test_without_check_data_the_notes_name_the_synthetic_pool(
    tiny_models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx, pt = tiny_models
    assert cli.main(_throughput_argv(onnx, pt, tmp_path)) == 0
    assert "on the first 2 frames of the synthetic pool (the timed frames)" in capsys.readouterr().out
    check = json.loads((tmp_path / "t.json").read_text())["naive_check"]
    assert (check["source"], check["frames"], check["files"]) == ("synthetic pool", 2, [])
