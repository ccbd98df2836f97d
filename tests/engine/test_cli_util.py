"""The shared CLI helpers."""

from __future__ import annotations

import io
import multiprocessing.synchronize
import threading

from engine.cli_util import progress_bar


def test_progress_bars_take_no_multiprocessing_lock_and_start_no_monitor_thread() -> None:
    from tqdm import tqdm

    out = io.StringIO()
    before = {t.name for t in threading.enumerate()}
    assert list(progress_bar(range(5), file=out, desc="frames", show=True)) == list(range(5))
    assert "frames" in out.getvalue() and "5/5" in out.getvalue()
    lock = tqdm.get_lock()
    assert not isinstance(lock, multiprocessing.synchronize.SemLock)
    assert not any(isinstance(k, multiprocessing.synchronize.SemLock) for k in getattr(lock, "locks", []))
    assert tqdm.monitor_interval == 0 and tqdm.monitor is None
    assert {t.name for t in threading.enumerate()} <= before | {"MainThread"}


def test_progress_bars_draw_only_on_a_terminal_unless_told() -> None:
    """A log file or pipe gets no redrawn bars (show=None, the default); show=True forces them."""
    for show, drawn in ((None, False), (False, False), (True, True)):
        out = io.StringIO()  # not a terminal
        assert list(progress_bar(range(3), file=out, desc="frames", show=show)) == [0, 1, 2]
        assert ("3/3" in out.getvalue()) == drawn, show
