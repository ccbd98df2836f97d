"""The CPU backends' fast post-processing (engine.fastpost, engine.lowres) against the whole graph.

The contract: masks, counts and present equal ONNX Runtime's on the unsplit fp32 graph, except
pixels whose graph probability lies within BAND of the class threshold (float32 rounding of a
differently ordered resize could flip those); counts are the masks' sums; present is
``counts >= min_area`` (and the gate). The kernel uses ONNX Runtime's own resize formula, so on ONNX
Runtime no pixel differs at all here; the band is what the contract promises. Models: the random
tiny ensemble (trained-like thresholds per class) in fp32 and as an FP16 graph, the defect model
(known defects), a gated ensemble with flip TTA at an odd frame size (a non-integer upscale), and
one whose frames are smaller than its training size (the resize back is a downscale).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.backends import BackendUnavailable, load_backend

#: Pixels whose graph probability lies this close to the threshold may differ (float32 rounding).
BAND = 1e-6


def _export(root: Path, name: str, unet: dict, input_size, train_size, folds: int, postprocess: dict) -> Path:
    from tests.fixtures import make_tiny_run
    from trainer.export import export_onnx

    run = make_tiny_run(root / name, folds=folds, unet=unet, input_size=input_size, train_size=train_size,
                        postprocess=postprocess)
    out = root / f"{name}.onnx"
    export_onnx(run, out, drift_frames=0)
    return out


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> dict[str, Path]:
    """A gated 2-fold ensemble with hflip TTA on 61x317 frames, a 1-fold hvflip model on 30x150
    frames trained at 32x160 (its resize back is a downscale), thresholds near the random U-Nets'
    0.5; and the tiny ensemble as an FP16 graph (U-Nets in fp16, the decision in fp32)."""
    from tests.fixtures import TINY_UNET
    from trainer.export import export_onnx

    root = tmp_path_factory.mktemp("fastpost_models")
    gated = _export(root, "gated", {**TINY_UNET, "gate": True}, (61, 317), (32, 160), 2,
                    {"thresholds": [0.49, 0.5, 0.51, 0.52], "min_areas": [100, 2000, 10, 0], "tta": "hflip",
                     "gate_thresholds": [0.3, 0.5, 0.6, 0.1]})
    down = _export(root, "down", TINY_UNET, (30, 150), (32, 160), 1,
                   {"thresholds": [0.48, 0.5, 0.505, 0.53], "min_areas": [1, 500, 1000, 0], "tta": "hvflip"})
    fp16 = root / "fp16.onnx"
    export_onnx(tiny_run, fp16, precision="fp16", drift_frames=0)
    return {"gated": gated, "down": down, "fp16": fp16}


def graph_probs(path: Path, frames: np.ndarray) -> np.ndarray:
    """The graph's full-resolution probabilities (the tensor its threshold compares), by ONNX Runtime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    masks_cast = next(n for n in model.graph.node if "masks" in n.output)
    producers = {o: n for n in model.graph.node for o in n.output}
    node = masks_cast
    while node.op_type != "GreaterOrEqual":
        node = producers[node.input[0]]
    model.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([node.input[0]], {"frames": frames})[0]


def assert_same_decision(fast, graph, probs: np.ndarray, meta) -> int:
    """Asserts the fast result is the graph's within BAND; returns how many pixels differ."""
    thresholds = np.asarray(meta.thresholds, np.float32)[None, :, None, None]
    differ = fast.masks != graph.masks
    assert np.all(np.abs(probs[differ] - thresholds[np.nonzero(differ)[1]].reshape(-1)) <= BAND)
    assert fast.masks.dtype == np.uint8 and fast.counts.dtype == np.int32 and fast.present.dtype == np.bool_
    assert fast.masks.shape == graph.masks.shape
    np.testing.assert_array_equal(fast.counts, fast.masks.sum(axis=(2, 3)))
    present = fast.counts >= np.asarray(meta.min_areas)[None, :]
    if meta.gate_thresholds is not None:
        present &= fast.gate >= np.asarray(meta.gate_thresholds, np.float32)[None, :]
    np.testing.assert_array_equal(fast.present, present)
    if not differ.any():
        np.testing.assert_array_equal(fast.counts, graph.counts)
        np.testing.assert_array_equal(fast.present, graph.present)
        assert fast.rle() == graph.rle()
    return int(differ.sum())


def _frames(meta, n: int, seed: int) -> np.ndarray:
    from toolchain.parity import synthetic_frames

    return synthetic_frames(n, *meta.input_size, seed=seed)


@pytest.mark.parametrize("model", ["tiny", "defect", "gated", "down", "fp16"])
def test_onnxruntime_fast_path_is_the_whole_graph(model: str, tiny_onnx: Path, defect_onnx: Path,
                                                   odd_models: dict[str, Path]) -> None:
    path = {"tiny": tiny_onnx, "defect": defect_onnx, **odd_models}[model]
    with load_backend(path, device="cpu", backend="onnxruntime", postprocess="graph") as whole:
        meta = whole.metadata
        frames = _frames(meta, 5, seed=11)
        expected = whole.infer(frames)
    with load_backend(path, device="cpu", backend="onnxruntime") as fast:
        assert fast.describe()["postprocess"].startswith("fast")
        got = fast.infer(frames)
        single = fast.infer(frames[2:3])
    assert assert_same_decision(got, expected, graph_probs(path, frames), meta) == 0  # ORT's own formula: bit-exact
    np.testing.assert_array_equal(single.masks, got.masks[2:3])
    # Not vacuous: defects found, and classes both present and absent.
    assert expected.counts.sum() > 0 and expected.present.any() and not expected.present.all()


@pytest.mark.parametrize("model", ["tiny", "gated"])
def test_openvino_fast_path_is_its_whole_graph(model: str, tiny_onnx: Path, odd_models: dict[str, Path]) -> None:
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'strip-inspection[cpu]')")
    path = {"tiny": tiny_onnx, **odd_models}[model]
    with load_backend(path, device="cpu", backend="openvino", precision="fp32", postprocess="graph") as whole:
        meta = whole.metadata
        frames = _frames(meta, 4, seed=3)
        expected = whole.infer(frames)
        probs = whole.__class__(path, precision="fp32", with_probs=True).infer(frames).probs
    with load_backend(path, device="cpu", backend="openvino", precision="fp32") as fast:
        assert fast.describe()["postprocess"].startswith("fast")
        got = fast.infer(frames)
    assert_same_decision(got, expected, probs, meta)
    with load_backend(path, device="cpu", backend="onnxruntime", postprocess="graph") as reference:
        np.testing.assert_array_equal(got.present, reference.infer(frames).present)


def test_openvino_ir_of_a_gated_model_takes_the_fast_path(odd_models: dict[str, Path], tmp_path: Path) -> None:
    """An IR (engine build --target openvino) keeps the graph's decision, so the fast path finds it there
    too; a gated model's IR builds (its parity allows the gate to clear present)."""
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'strip-inspection[cpu]')")
    from toolchain.cli import main

    ir = tmp_path / "gated.xml"
    assert main(["build", "--target", "openvino", "--onnx", str(odd_models["gated"]), "--out", str(ir),
                 "--precision", "fp32", "--parity-frames", "4"]) == 0
    with load_backend(ir, device="cpu", postprocess="graph") as whole, load_backend(ir, device="cpu") as fast:
        assert fast.describe()["postprocess"].startswith("fast")
        frames = _frames(whole.metadata, 3, seed=4)
        probs = whole.__class__(ir, with_probs=True).infer(frames).probs
        assert_same_decision(fast.infer(frames), whole.infer(frames), probs, whole.metadata)


def _reference_resize(low: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """ONNX Runtime's half-pixel bilinear resize, written out in numpy float32 (its formula and order)."""
    from engine.fastpost import resize_axis

    yi0, yi1, wy0, wy1 = resize_axis(low.shape[2], size[0])
    xi0, xi1, wx0, wx1 = resize_axis(low.shape[3], size[1])
    rows0, rows1 = low[:, :, yi0], low[:, :, yi1]
    return ((wy0[:, None] * wx0[None, :]) * rows0[..., xi0] + (wy0[:, None] * wx1[None, :]) * rows0[..., xi1]
            + (wy1[:, None] * wx0[None, :]) * rows1[..., xi0] + (wy1[:, None] * wx1[None, :]) * rows1[..., xi1])


@pytest.mark.parametrize(("low", "frame"), [((8, 40), (32, 160)), ((7, 13), (61, 317)), ((32, 160), (30, 150)),
                                            ((16, 16), (16, 16))])
def test_kernel_is_the_resize_then_threshold(low: tuple[int, int], frame: tuple[int, int]) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from engine.fastpost import FastPostprocess
    from engine.metadata import ModelMetadata

    rng = np.random.default_rng(0)
    thresholds = [0.1, 0.5, 0.7, 0.95]
    probs = rng.uniform(0, 1, (3, 4, *low)).astype(np.float32)
    probs[0, 1] = 0.02  # a plane wholly below its threshold: cleared without arithmetic
    probs[1, 2, 2] = 0.7  # a row exactly at the threshold
    probs[2, 3] = 0.5
    probs[2, 3, 1] = 0.95 + 5e-6  # a plane below its threshold but for one row just above (within the skip margin)
    meta = ModelMetadata(thresholds=thresholds, min_areas=[0, 5, 50, 10 ** 6], input_height=frame[0],
                         input_width=frame[1], train_height=low[0], train_width=low[1])
    got = FastPostprocess(meta)(probs)
    resize = helper.make_node("Resize", ["p", "", "", "sizes"], ["r"], mode="linear",
                              coordinate_transformation_mode="half_pixel")
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [4], [3, 4, *frame])
    model = helper.make_model(helper.make_graph([resize], "resize", [helper.make_tensor_value_info(
        "p", TensorProto.FLOAT, None)], [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)], [sizes]),
        opset_imports=[helper.make_opsetid("", 17)])
    resized = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"p": probs})[0]
    np.testing.assert_array_equal(_reference_resize(probs, frame), resized)
    expected = resized >= np.asarray(thresholds, np.float32)[None, :, None, None]
    np.testing.assert_array_equal(got["masks"], expected.astype(np.uint8))
    np.testing.assert_array_equal(got["counts"], expected.sum(axis=(2, 3)))
    np.testing.assert_array_equal(got["present"], got["counts"] >= np.asarray(meta.min_areas))


@pytest.mark.parametrize("images", [1, 3])
def test_planes_split_between_threads_decide_as_one_thread_does(images: int) -> None:
    """The batch's planes are shared between the caller and the helper threads: the masks and counts are
    those of the kernel run over every plane in one thread."""
    from engine import fastpost
    from engine.metadata import ModelMetadata

    low, frame = (6, 20), (24, 81)
    meta = ModelMetadata(thresholds=[0.3, 0.5, 0.7, 0.9], min_areas=[0, 0, 0, 0], input_height=frame[0],
                         input_width=frame[1], train_height=low[0], train_width=low[1])
    probs = np.random.default_rng(images).uniform(0, 1, (images, 4, *low)).astype(np.float32)
    post = fastpost.FastPostprocess(meta)
    got = post(probs)
    masks = np.empty((images, 4, *frame), np.uint8)
    counts = np.empty((images, 4), np.int32)
    post.kernel.decide(probs, post.thresholds, np.float32(fastpost.MARGIN), *fastpost.resize_axis(low[0], frame[0]),
                       *fastpost.resize_axis(low[1], frame[1]), masks, counts, 0, images * 4)
    np.testing.assert_array_equal(got["masks"], masks)
    np.testing.assert_array_equal(got["counts"], counts)
    assert fastpost._helpers()[1] == fastpost.usable_cpus() - 1


def test_the_choice_is_checked_and_said(tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx

    with pytest.raises(ValueError, match="postprocess must be one of auto, fast, graph"):
        load_backend(tiny_onnx, device="cpu", backend="onnxruntime", postprocess="quick")
    with load_backend(tiny_onnx, device="cpu", backend="onnxruntime", postprocess="graph") as whole:
        assert whole.describe()["postprocess"] == "graph (asked for)"
    # Metadata whose thresholds the graph does not use: the graph is the truth, so the fast path refuses.
    model = onnx.load(str(tiny_onnx))
    for prop in model.metadata_props:
        if prop.key == "inspection.thresholds":
            prop.value = json.dumps([0.3] * 4)
    drifted = tmp_path / "drifted.onnx"
    onnx.save(model, str(drifted))
    with load_backend(drifted, device="cpu", backend="onnxruntime") as backend:
        assert "thresholds" in backend.describe()["postprocess"] and backend.fast is None
    with pytest.raises(BackendUnavailable, match="graph's thresholds .* differ from its metadata"):
        load_backend(drifted, device="cpu", backend="onnxruntime", postprocess="fast")


def test_without_numba_the_graph_post_processes(tiny_onnx: Path, monkeypatch) -> None:
    import engine

    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(sys.modules, "engine.fastpost_kernel", raising=False)
    monkeypatch.delattr(engine, "fastpost_kernel", raising=False)
    with load_backend(tiny_onnx, device="cpu", backend="onnxruntime") as backend:
        assert backend.fast is None and "numba is not installed" in backend.describe()["postprocess"]
    with pytest.raises(BackendUnavailable, match="numba is not installed"):
        load_backend(tiny_onnx, device="cpu", backend="onnxruntime", postprocess="fast")
