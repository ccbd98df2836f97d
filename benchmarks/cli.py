"""``bench``: images/sec and latency per backend and end to end."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engine.cli_util import run_cli

COMMANDS: dict[str, str] = {
    "throughput": "benchmarks.throughput",
    "stream": "benchmarks.stream",
    "model": "benchmarks.models",
    "failover": "benchmarks.failover",
    "coil-close": "benchmarks.coilclose",
    "swap": "benchmarks.swap",
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("bench", __doc__.split(":", 1)[1].strip(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
