"""``engine.hashing`` and ``engine info`` on an ONNX file without torch."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from engine.hashing import file_digest, file_sha256


def test_digest_of_a_multi_block_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > 2 MiB: several read blocks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_digest(path) == (len(data), hashlib.sha256(data).hexdigest())


def test_engine_info_on_onnx_does_not_import_torch(tiny_onnx: Path) -> None:
    code = (
        "import json, sys\n"
        "from toolchain.cli import main\n"
        f"rc = main(['info', {str(tiny_onnx)!r}, '--json'])\n"
        "heavy = sorted(m for m in ('torch', 'segmentation_models_pytorch', 'matplotlib') if m in sys.modules)\n"
        "print('MODULES', json.dumps(heavy))\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert '"sha256"' in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith("MODULES"))
    assert json.loads(line.split(" ", 1)[1]) == []
