"""The installs without training: in a fresh venv, first the core dependencies alone (``pip install .``)
run the camera side (``import client.camera``, ``camera --help``) without the server's extras; then
``pip install '.[serve,cpu]'`` on top serves an ONNX model without torch, segmentation-models-pytorch
or matplotlib (which then cannot have been imported either).

A real venv, real pip installs from this checkout (a copy of its packages: pip's cache makes them
quick after the first run; the second adds only the extras), a real ``server serve`` process, a
real gRPC client.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
from tests.server.test_service import assert_equals_direct, make_request

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "segmentation_models_pytorch", "matplotlib", "torchvision", "timm")
SERVER_EXTRAS = ("aiohttp", "onnxruntime", "openvino", "numba")
SOURCES = ("pyproject.toml", "README.md", "engine", "network", "toolchain", "trainer", "server", "client", "coils",
           "benchmarks", "protos")


def _run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    # Without PYTHONPATH: the venv must find its own installed copy, never this checkout's packages.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _installed(python: Path, modules: tuple[str, ...]) -> str:
    """The JSON list of ``modules`` that ``python`` can import."""
    probe = f"import importlib.util, json; print(json.dumps([m for m in {list(modules)!r} if importlib.util.find_spec(m)]))"
    return _run([str(python), "-c", probe], timeout=60).stdout.strip()


def test_serve_install_serves_onnx_without_torch(tmp_path: Path, defect_onnx: Path, camera_frames, direct_output):
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", str(source)], timeout=600)
    assert _installed(python, HEAVY + SERVER_EXTRAS) == "[]"
    _run([str(python), "-c", "import client.camera, client.stream_folder, client.status"], timeout=60, cwd=tmp_path)
    assert "usage: camera stream" in _run([str(venv / "bin" / "camera"), "stream", "--help"], timeout=60).stdout

    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", f"{source}[serve,cpu]"],
         timeout=600)
    assert _installed(python, HEAVY) == "[]"
    # `engine info` (the toolchain's console script) works on the serving install too.
    info = _run([str(venv / "bin" / "engine"), "info", str(defect_onnx)], timeout=120).stdout
    assert info.startswith(f"{defect_onnx}  (onnx)") and "runs on" in info

    process = subprocess.Popen(
        [str(venv / "bin" / "server"), "serve", "--model", str(defect_onnx), "--port", "0", "--metrics-port", "-1",
         "--device", "cpu", "--max-batch", "2"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read_log() -> None:
        for line in process.stderr:
            lines.append(line)
            if "event=ready" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read_log, daemon=True).start()
    try:
        assert ready.wait(120) and process.poll() is None, "server serve did not start:\n" + "".join(lines)
        address = next(m.group(1) for line in lines if (m := re.search(r"event=start address=(\S+)", line)))
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            answer = pb_grpc.InspectionServiceStub(channel).InspectOne(make_request("cam0", 7, camera_frames[0]),
                                                                        timeout=60)
        assert answer.frame_id == 7
        assert_equals_direct(answer, direct_output, 0)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, "".join(lines)
