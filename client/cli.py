"""``camera``: the camera side on its own, for a machine without the server installed.

The same subcommand modules as ``server client`` (here ``camera stream``) and ``server status``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engine.cli_util import run_cli

DESCRIPTION = "stream a folder of images to an inspection server as cameras, or show its line status"
COMMANDS: dict[str, str] = {
    "stream": "client.stream_folder",
    "status": "client.status",
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("camera", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
