"""The shared shape of the project's command-line tools: ``tool SUBCOMMAND --flags``.

Each subcommand lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported when the parser is built, so they keep heavy
imports (torch, onnxruntime) inside ``run``. Expected failures (bad input, missing files, an
unavailable backend) print one ``tool sub: error: ...`` line and exit 2; ``--debug`` or
``STRIP_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence


class CLIError(Exception):
    """An expected failure with a message meant for the user."""


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (CLIError, ValueError, FileNotFoundError, RuntimeError, OSError)


def run_cli(prog: str, description: str, commands: dict[str, str], argv: Sequence[str] | None = None) -> int:
    """Builds ``prog``'s parser from ``commands`` (name -> module path) and runs the chosen one."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for name, module_path in commands.items():
        module = importlib.import_module(module_path)
        modules[name] = module
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("STRIP_DEBUG") == "1"
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        if debug:
            raise
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


def progress_bar(*args, show: bool | None = None, **kwargs):
    """A ``tqdm`` progress bar (same arguments) drawn only where it helps.

    ``show`` True draws it always, False never, None (the default) only when the output is a
    terminal (tqdm's ``disable=None``), so logs and pipes stay readable. It uses an in-process lock
    and no monitor thread: tqdm's default lock also holds a multiprocessing semaphore its monitor
    thread takes every 10 s, which aborted long processes that also forked data-loader workers.
    """
    import threading

    from tqdm import tqdm

    if not getattr(tqdm, "_strip_lock_set", False):
        tqdm.monitor_interval = 0
        tqdm.set_lock(threading.RLock())
        tqdm._strip_lock_set = True
    kwargs.setdefault("disable", None if show is None else not show)
    return tqdm(*args, **kwargs)
