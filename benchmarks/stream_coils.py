"""``bench stream --coil-db URL --line FILE``: the same stream settings with coil tracking off, then on.

After the usual settings (a server without coil tracking), a second server is started with
``--line FILE --coil-db URL`` and every stream count runs again on the same frames, now carrying
coils: stream ``i`` is the line's camera ``i`` (the line needs as many cameras as the largest
stream count: ``trainer synth-line --cameras 16``), all streams of a setting on one coil, each
camera's frames one frame length apart along it; the coil is ended (``EndCoil``) once its frames
are answered. The report lists both runs (column "coils") and the frames/s ratio on/off
per stream count: the price of storing every frame's components before its answer. A SQLite
``--coil-db`` file gives each kind of setting (``on``, ``on+actions``) a fresh file beside it
(:func:`setting_database`): the second would otherwise write into tables the first filled.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

def check_coil_settings(coil_db: str | None, line: Path | None, target: str | None, streams: tuple[int, ...]) -> None:
    """``--coil-db`` and ``--line`` come together, with a server bench stream starts, and a line of
    at least as many cameras as the largest stream count.

    Raises:
        ValueError: naming the flag.
        FileNotFoundError: the line description is missing.
    """
    if (coil_db is None) != (line is None):
        raise ValueError("--coil-db and --line go together: coil tracking places frames with the line's geometry")
    if coil_db is None:
        return
    if target is not None:
        raise ValueError("--coil-db starts a coil-tracking server of its own; it contradicts --target")
    from coils.line import load_line

    if not Path(line).is_file():
        raise FileNotFoundError(f"--line {line}: no such line description")
    cameras = len(load_line(line).cameras)
    if max(streams) > cameras:
        raise ValueError(f"--line {line} has {cameras} cameras, --streams asks for {max(streams)}: each stream is "
                         "one camera of the line (trainer synth-line --cameras N writes a wider line)")


def coil_server_flags(coil_db: str, line: Path, spool: Path, line_actions: Path | None = None) -> list[str]:
    """``server serve``'s coil-tracking flags (the spool in ``spool``: any database can use it); with
    ``line_actions``, grades and alarms from that rule file and the OPC UA server too (on a free port)."""
    flags = ["--line", str(line), "--coil-db", coil_db, "--coil-spool", str(spool)]
    if line_actions is not None:
        flags += [*("--grading", str(line_actions)), *line_action_options(free_port())]
    return flags


def line_action_options(port: int) -> tuple[str, ...]:
    """The OPC UA flags of a line-actions run: loopback, anonymous (nothing connects; publishing still runs)."""
    return "--opcua-endpoint", f"opc.tcp://127.0.0.1:{port}", "--opcua-anonymous"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setting_database(url: str, label: str) -> str:
    """The database of the ``label`` settings: for a SQLite file, a fresh file of its own beside it
    (``coils.db`` -> ``coils-on.db``, ``coils-on-actions.db``), so no setting writes into a table the
    one before filled (a larger B-tree, a longer WAL) and the on/off ratios compare like with like.
    Other databases (PostgreSQL, SQLite in memory) are used as given; their settings share them."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return url
    path = Path(parsed.database)
    fresh = path.with_name(f"{path.stem}-{label.replace('+', '-')}{path.suffix}")
    for stale in (fresh, fresh.with_name(fresh.name + "-wal"), fresh.with_name(fresh.name + "-shm")):
        if stale.exists():
            log.info("removing %s: each bench run starts its settings on a fresh database", stale)
            stale.unlink()
    return parsed.set(database=str(fresh)).render_as_string(hide_password=False)


def coil_shots(line: Path, images: list[Path], streams: int, coil_id: str) -> tuple[dict[str, list], dict]:
    """``images`` dealt to the line's first ``streams`` cameras, all on coil ``coil_id``.

    Returns:
        (camera id -> its :class:`client.stream_folder.Shot` list, {coil_id: its length in mm}).
    """
    from client.stream_folder import Shot
    from coils.line import load_line

    shots: dict[str, list[Shot]] = {}
    length = 0.0
    for i, camera in enumerate(load_line(line).cameras[:streams]):
        mine = images[i::streams]
        step = camera.frame_length_mm
        shots[camera.camera_id] = [Shot(n, path, path.name, coil_id, n * step) for n, path in enumerate(mine)]
        length = max(length, len(mine) * step)
    return {camera_id: frames for camera_id, frames in shots.items() if frames}, {coil_id: length}


def run_coil_settings(cfg: Any, model: Path, images: list[Path], server_factory: Any,
                      run_setting: Any, label: str = "on") -> list[dict[str, Any]]:
    """Every stream count again through a coil-tracking server; each setting's dict marked ``coils: LABEL``
    (``on``, or ``on+actions`` when the factory's server also runs grades, alarms and OPC UA).

    Args:
        server_factory: ``(cfg, model, spool) -> server`` (bench stream's subprocess or in-process one,
            tracking coils with its spool in ``spool``).
        run_setting: bench stream's ``run_setting`` (it takes ``shots`` and ``coil_lengths``).
    """
    settings = []
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())  # coil ids of earlier runs in the same database differ
    cfg = replace(cfg, coil_db=setting_database(cfg.coil_db, label))
    with tempfile.TemporaryDirectory(prefix="bench-coil-spool-") as spool:
        server = server_factory(cfg, model, Path(spool))
        try:
            if cfg.warmup_frames:
                shots, lengths = coil_shots(cfg.line, images[: cfg.warmup_frames], 1, f"bench-{stamp}-{label}-warmup")
                run_setting(server.target, images[: cfg.warmup_frames], 1, 0.0, None, cfg.connect_timeout,
                            shots=shots, coil_lengths=lengths)
            pid = getattr(getattr(server, "process", None), "pid", None)  # a subprocess server: its CPU is counted
            for n, streams in enumerate(cfg.streams):
                shots, lengths = coil_shots(cfg.line, images, streams, f"bench-{stamp}-{label}-{n}")
                before = process_cpu_s(pid)
                setting = run_setting(server.target, images, streams, cfg.fps, server.metrics_url,
                                      cfg.connect_timeout, shots=shots, coil_lengths=lengths)
                settings.append({**setting, "coils": label, "coil_db": cfg.coil_db,
                                 "server_cpu_ms_per_frame": cpu_per_frame(before, process_cpu_s(pid), setting)})
        finally:
            server.close()
    return settings


def process_cpu_s(pid: int | None) -> tuple[float, float] | None:
    """CPU seconds (user + system) of process ``pid`` and of its live child processes (the line watch),
    from Linux's ``/proc``; None for no pid or where ``/proc`` cannot tell."""
    if pid is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")

    def stat(path: Path) -> tuple[int, float] | None:  # (parent pid, CPU seconds)
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / tick

    own = stat(Path(f"/proc/{pid}/stat"))
    if own is None:
        return None
    children = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (child := stat(entry / "stat")) is not None and child[0] == pid:
            children += child[1]
    return own[1], children


def cpu_per_frame(before: tuple[float, float] | None, after: tuple[float, float] | None,
                  setting: dict[str, Any]) -> dict[str, float] | None:
    """The server's CPU milliseconds per answered frame over one setting: its own process and its children."""
    frames = setting.get("frames", 0) - setting.get("errors", 0) - setting.get("unanswered", 0)
    if before is None or after is None or frames <= 0:
        return None
    return {"server": 1000 * (after[0] - before[0]) / frames, "children": 1000 * (after[1] - before[1]) / frames}


def run_repeated_coil_settings(cfg: Any, model: Path, images: list[Path], kinds: dict[str, Any],
                               run_setting: Any) -> list[dict[str, Any]]:
    """:func:`run_coil_settings` for every kind (label -> server factory), ``cfg.coil_repeats`` times; the
    kinds' order reversed every other repeat (on, on+actions, on+actions, on, ...), so a slow drift of
    the machine's speed weighs on both alike. Each setting's dict carries ``repeat`` and ``repeats``."""
    settings = []
    for repeat in range(cfg.coil_repeats):
        order = list(kinds.items())
        for label, factory in order if repeat % 2 == 0 else order[::-1]:
            settings += [{**s, "repeat": repeat, "repeats": cfg.coil_repeats}
                         for s in run_coil_settings(cfg, model, images, factory, run_setting, label)]
    return settings


def _ratios(settings: list[dict[str, Any]], top: str, bottom: str) -> list[str]:
    """Per stream count: frames/s of ``top`` over ``bottom`` settings, one ratio per repeat (the single
    ``off`` setting serves every repeat), with their median where there are several."""
    def by(label: str) -> dict[int, dict[int, float]]:
        out: dict[int, dict[int, float]] = {}
        for s in settings:
            if s.get("coils") == label and s["frames_per_s"]:
                out.setdefault(s["streams"], {})[s.get("repeat", 0)] = s["frames_per_s"]
        return out

    tops, bottoms, parts = by(top), by(bottom), []
    for n in sorted(tops):
        if n not in bottoms:
            continue
        under = bottoms[n]
        ratios = [value / under.get(r, under[min(under)]) for r, value in sorted(tops[n].items())]
        text = f"{n} streams {statistics.median(ratios):.3f}"
        parts.append(text if len(ratios) == 1 else
                     f"{text} (median of {len(ratios)}: {', '.join(f'{r:.3f}' for r in ratios)})")
    return parts


def _cpu_note(settings: list[dict[str, Any]]) -> str | None:
    """Server CPU per frame by kind of setting and stream count (medians over repeats): the work each
    kind costs, which a change in the machine's speed moves far less than frames/s."""
    parts = []
    for label in ("on", "on+actions"):
        by_streams: dict[int, list[dict[str, float]]] = {}
        for s in settings:
            if s.get("coils") == label and s.get("server_cpu_ms_per_frame"):
                by_streams.setdefault(s["streams"], []).append(s["server_cpu_ms_per_frame"])
        for n, values in sorted(by_streams.items()):
            own = statistics.median(v["server"] for v in values)
            children = statistics.median(v["children"] for v in values)
            parts.append(f"{label} {n} streams {own:.2f} + {children:.2f}")
    if not parts:
        return None
    return ("server CPU ms per answered frame (its process + its child processes, the line watch; medians "
            "over repeats): " + ", ".join(parts))


def coil_ratio_note(settings: list[dict[str, Any]]) -> str | None:
    """The note comparing frames/s with coil tracking on and off per stream count, or None."""
    pairs = _ratios(settings, "on", "off")
    actions = _ratios(settings, "on+actions", "on")
    notes = []
    if pairs:
        notes.append("coil tracking: frames/s with it on over off, same frames and stream counts: " + ", ".join(pairs))
    if actions:
        notes.append("line actions (grades, alarms, OPC UA publishing): frames/s with them on over coil tracking "
                     "alone: " + ", ".join(actions))
    cpu = _cpu_note(settings)
    if cpu:
        notes.append(cpu)
    databases = {s["coils"]: s["coil_db"] for s in settings if s.get("coil_db")}
    if databases:
        notes.append("coil databases: " + ", ".join(f"{label} {url}" for label, url in databases.items()))
    return "; ".join(notes) or None


__all__ = ["check_coil_settings", "coil_ratio_note", "coil_server_flags", "coil_shots", "run_coil_settings",
           "run_repeated_coil_settings", "setting_database"]

