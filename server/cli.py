"""``server``: serve a model over gRPC, stream images to it as cameras, and read its coils back."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engine.cli_util import run_cli

COMMANDS: dict[str, str] = {
    "serve": "server.serve",
    "models": "server.models_cli",
    "client": "client.stream_folder",
    "status": "client.status",
    "coils": "server.coils_cli",
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("server", __doc__.split(":", 1)[1].strip(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
