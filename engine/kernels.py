"""The compiled kernels' modules (numba, the ``cpu`` extra), imported only where numba is installed.

Each kernel module imports numba at its top; its caller imports it through :func:`import_kernel` and
decides what runs without it (:mod:`engine.rle`: numpy; :mod:`engine.fastpost`: the whole graph).
"""

from __future__ import annotations

import importlib
from types import ModuleType


def import_kernel(name: str) -> tuple[ModuleType | None, str]:
    """The kernel module ``name`` (a full name, e.g. ``engine.rle_kernel``), or None and why not.

    Raises:
        ImportError: the project's own code failed to import (a bug, not a missing numba).
    """
    try:
        return importlib.import_module(name), ""
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] == name.split(".")[0]:
            raise
        return None, f"numba is not installed ({exc})"
