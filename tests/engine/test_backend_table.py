"""engine.backends' one suffix table, and the one way a graph's outputs become an InspectionResult."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from engine import graph
from engine.backends import BACKENDS, SUFFIXES, backend_class, result_from_outputs

ROOT = Path(__file__).resolve().parents[2]


def test_each_suffix_picks_the_first_backend_listed_for_it():
    assert SUFFIXES == {".onnx": "onnxruntime", ".xml": "openvino", ".engine": "tensorrt", ".plan": "tensorrt",
                        ".pt": "torch"}
    assert BACKENDS["torch"][0] == "network.backend"  # torch code lives with the network, named not imported
    assert backend_class("model.pt").__module__ == "network.backend"


def test_a_pt_model_without_torch_says_what_to_install(tmp_path: Path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"not loaded")
    probe = (
        "import sys; sys.modules['torch'] = None\n"
        "from engine.backends import BackendUnavailable, load_backend\n"
        f"try:\n    load_backend({str(model)!r})\nexcept BackendUnavailable as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "the torch backend needs torch, which cannot be imported" in done.stdout and "strip-inspection[train]" in done.stdout


def test_outputs_by_name_become_a_typed_result():
    n, c, h, w = 2, 3, 4, 5
    outputs = {
        graph.INPUT_NAME: np.zeros((n, h, w), np.uint8),  # extra tensors are ignored
        graph.MASKS.name: np.ones((n, c, h, w), np.uint8),
        graph.COUNTS.name: np.full((n, c), 20, np.int64),  # OpenVINO widens integers
        graph.PRESENT.name: np.ones((n, c), np.uint8),
    }
    result = result_from_outputs(outputs)
    assert result.counts.dtype == np.int32 and result.present.dtype == bool and result.probs is None
    assert result.counts.tolist() == [[20] * c] * n and len(result) == n
    probs = np.full((n, c, h, w), 0.7, np.float32)
    assert result_from_outputs({**outputs, graph.PROBS_NAME: probs}, encoded=[["1 1"] * c] * n).probs is probs
