"""The ``trainer`` subcommands: argparse and ``run()`` each, cheap to import (no torch), so building
``trainer --help`` imports none of the training code; ``run()`` imports the library it drives."""
