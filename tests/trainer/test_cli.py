"""``trainer``'s command modules are cheap: building the parser (every subcommand's ``--help``)
imports no torch, so the library modules may import it at the top."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_no_torch(command: str | None) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    code = (f"import sys\nfrom trainer.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'segmentation_models_pytorch', 'matplotlib') "
            "if m in sys.modules)\nprint('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: trainer" in done.stdout and done.stdout.strip().endswith("HEAVY []"), done.stdout[-500:]
