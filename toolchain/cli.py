"""``engine``: build FP16 TensorRT engines and inspect model files."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engine.cli_util import run_cli

COMMANDS: dict[str, str] = {
    "build": "toolchain.build",
    "info": "toolchain.info",
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("engine", __doc__.split(":", 1)[1].strip(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
