"""``trainer``: synthetic data, folds, 5-fold training, evaluation and export."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engine.cli_util import run_cli

COMMANDS = {
    "synth": "trainer.commands.synth",
    "synth-line": "trainer.commands.synth_line",
    "split": "trainer.commands.split",
    "fit": "trainer.commands.fit",
    "evaluate": "trainer.commands.evaluate",
    "export": "trainer.commands.export",
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("trainer", __doc__.split(":", 1)[1].strip(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
