"""The camera side without the server's extras: ``client`` imports and its CLI runs with torch,
onnxruntime, openvino and aiohttp (and the ``server`` package itself) made unimportable.

A subprocess with a meta-path finder that refuses those modules, so the check is fast and needs no
network; ``tests/server/test_serve_install.py`` also installs the core dependencies alone into a
fresh venv and runs ``camera --help`` there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What the `serve`, `cpu`, `train` and `gpu` extras bring, and the server package: none may be needed.
BLOCKED = ("server", "aiohttp", "onnxruntime", "openvino", "torch", "torchvision", "segmentation_models_pytorch",
           "timm", "matplotlib", "tensorrt", "nncf")

PROBE = f"""
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked: the camera side must not need it")
        return None

sys.meta_path.insert(0, Refuse())
import client.camera, client.cli, client.status, client.stream_folder, client.wire  # noqa: E401
from client.cli import main

for argv in (["--help"], ["stream", "--help"], ["status", "--help"]):
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
assert not loaded, loaded
print("camera side OK")
"""


def test_the_camera_side_imports_and_runs_without_the_server_and_its_extras() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: camera stream" in done.stdout and "--give-up" in done.stdout
    assert "usage: camera status" in done.stdout
    assert done.stdout.rstrip().endswith("camera side OK")
