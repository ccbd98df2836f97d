"""Every server setting in one place: :class:`ServerConfig`, :class:`CaptureConfig`, the drift
settings and the limits of the wire protocol.

``server serve``'s flags are derived from the dataclass fields (:func:`add_arguments`,
:func:`config_from_args`): the default and help text a flag shows are the field's. Each limit is
checked once, by the function that owns its message (:func:`check_drift_settings`,
:func:`check_capture_limits`), whoever constructs the object (the CLI, a test, ``bench stream``).

The protocol limits (:data:`MAX_CAMERA_ID_BYTES`, :data:`MAX_MESSAGE_BYTES`) are owned by
:mod:`client.wire`, which the camera side imports without the server; they are imported here so
that the server's settings take their defaults from the same constants.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from client.wire import (
    MAX_CAMERA_ID_BYTES,
    MAX_COIL_ID_BYTES,
    MAX_MESSAGE_BYTES,
    RESEND_FINAL,
    RESEND_KEY,
    RESEND_YES,
)
from coils.line import Line, load_line
from engine.drift import DEFAULT_MIN_FILL
from server.capture_policy import DEFAULT_CAPTURE_POLICY, DEFAULT_UNCERTAIN_BAND, POLICY_TOKENS, CapturePolicy

#: Most characters of client input (a camera id, a policy token) quoted back in a message or a log line.
MAX_ECHO_CHARS = 64


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis and the full length, so that client input
    quoted in an answer or a log line stays small whatever the client sent."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


# Drift defaults: the monitor's policy, not the statistics (those are engine.drift's).
DEFAULT_DRIFT_WINDOW = 500
DEFAULT_DRIFT_MIN_FRAMES = DEFAULT_MIN_FILL
# Conventional PSI reading: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 significant shift.
DEFAULT_PSI_THRESHOLD = 0.25
# The KS statistic of two samples from one distribution stays below 1.95 / sqrt(n) with 99.9 %
# probability: 0.14 at the default minimum fill of 200 frames, so 0.2 is a real shift.
DEFAULT_KS_THRESHOLD = 0.2
DEFAULT_DRIFT_MAX_CAMERAS = 256

DEFAULT_COIL_SILENCE_S = 300.0
DEFAULT_COIL_SPOOL_MB = 1024.0
#: Where the spool goes beside a SQLite database file ``coils.db``: ``coils.db.spool/``.
SQLITE_SPOOL_SUFFIX = ".spool"

DEFAULT_CAPTURE_QUEUE = 64
DEFAULT_CAPTURE_QUOTA_GB = 5.0


def check_drift_settings(window: int, min_frames: int, psi_threshold: float, ks_threshold: float,
                         max_cameras: int = DEFAULT_DRIFT_MAX_CAMERAS) -> None:
    """The one check of the drift monitor's settings (ServerConfig and the monitor itself call it).

    Raises:
        ValueError: naming the setting, its flag and what it must be.
    """
    if window < 1:
        raise ValueError(f"drift_window (--drift-window) must be >= 1 frame, got {window}")
    if not 1 <= min_frames <= window:
        raise ValueError(
            f"drift_min_frames (--drift-min-frames) must lie in 1..drift_window ({window}), got {min_frames}"
        )
    for name, value in (("drift_psi_threshold", psi_threshold), ("drift_ks_threshold", ks_threshold)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name} ({flag}) must be a positive number, got {value}")
    if max_cameras < 1:
        raise ValueError(f"drift_max_cameras (--drift-max-cameras) must be >= 1, got {max_cameras}")


def check_capture_limits(quota_bytes: int, queue_size: int) -> None:
    """The one check of the capture writer's limits (CaptureConfig and CaptureWriter call it)."""
    if quota_bytes < 1:
        raise ValueError(
            f"capture quota (--capture-quota-gb) must be a positive size, got {quota_bytes} bytes"
        )
    if queue_size < 1:
        raise ValueError(f"capture queue size (--capture-queue) must be >= 1, got {queue_size}")


def _default_policy() -> CapturePolicy:
    return CapturePolicy.parse(DEFAULT_CAPTURE_POLICY)


@dataclass(frozen=True)
class CaptureConfig:
    """What ``server serve --capture*`` asks for; ``server.capture.CaptureWriter.from_config`` makes
    the writer once the model's minimum areas are known (they come from the model file).

    Attributes:
        directory: the capture folder.
        policy: which frames to capture.
        quota_bytes: the folder's size limit, existing content included.
        queue_size: captures waiting for the writer.
        seed: seeds the "sample" draws.
    """

    directory: Path
    policy: CapturePolicy = field(default_factory=_default_policy)
    quota_bytes: int = int(DEFAULT_CAPTURE_QUOTA_GB * 1e9)
    queue_size: int = DEFAULT_CAPTURE_QUEUE
    seed: int = 0

    def __post_init__(self) -> None:
        check_capture_limits(self.quota_bytes, self.queue_size)


@dataclass(frozen=True)
class CoilTrackingConfig:
    """Where coils are stored (``--coil-db``, ``--coil-spool``, ``--coil-spool-mb``, ``--coil-silence-s``),
    resolved: the spool folder is set (SQLite's default beside the database file)."""

    db_url: str
    spool_dir: Path
    spool_max_bytes: int
    silence_s: float


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL; None for another database or an in-memory one."""
    scheme, sep, rest = url.partition(":///")
    if not sep or scheme.split("+", 1)[0] != "sqlite" or not rest or rest.startswith(":memory:"):
        return None
    return Path(rest.split("?", 1)[0])


def check_coil_settings(db_url: str | None, spool: Path | None, spool_mb: float, silence_s: float,
                        line: Line | None) -> None:
    """The one check of the coil-tracking flags (:class:`ServerConfig` calls it).

    Raises:
        ValueError: naming the flag and what it needs.
    """
    if db_url is None:
        if spool is not None:
            raise ValueError("--coil-spool needs --coil-db (the database the spooled frames wait for)")
        return
    if line is None:
        raise ValueError("--coil-db needs --line (the line's geometry places each frame's defects on the coil)")
    if spool is None and sqlite_file(db_url) is None:
        raise ValueError(f"--coil-db {db_url.split('://', 1)[0]}://...: --coil-spool DIR is needed (only a SQLite "
                         "database file has a default spool, beside it)")
    if not (math.isfinite(silence_s) and silence_s > 0):
        raise ValueError(f"coil_silence_s (--coil-silence-s) must be a positive number of seconds, got {silence_s}")
    if not (math.isfinite(spool_mb) and spool_mb > 0):
        raise ValueError(f"coil_spool_mb (--coil-spool-mb) must be a positive size, got {spool_mb}")


def _setting(default: Any, help: str, flag: bool = True, **argparse_options: Any) -> Any:
    """A ServerConfig field that is also a ``server serve`` flag (``--name-with-dashes``)."""
    return field(default=default, metadata={"help": help, "flag": flag, "argparse": argparse_options})


@dataclass
class ServerConfig:
    """How a server listens, batches and bounds its work; each field is a ``server serve`` flag
    (its help text is in the field's metadata).

    ``metrics_port`` None disables the endpoint (``--metrics-port -1``); ``warmup`` False is
    ``--no-warmup``; ``capture`` comes from the ``--capture*`` flags (:func:`capture_from_args`).
    """

    bind: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(50051, "gRPC port; 0 picks a free one")
    max_batch: int = _setting(16, "most frames per inference batch")
    max_delay_ms: float = _setting(5.0, "longest a frame waits for its batch to fill")
    max_inflight: int = _setting(
        256, "frames read and not yet answered over all calls; past it streams stop reading and "
        "InspectOne answers RESOURCE_EXHAUSTED")
    max_stream_inflight: int = _setting(64, "frames read and not yet answered per stream")
    metrics_port: int | None = _setting(9100, "Prometheus /metrics port; 0 picks a free one, -1 disables")
    tls_cert: Path | None = _setting(None, "PEM certificate chain: serve TLS", type=Path)
    tls_key: Path | None = _setting(None, "PEM private key of --tls-cert", type=Path)
    tls_client_ca: Path | None = _setting(
        None, "PEM CA certificate(s): every client must present a certificate it signed (mutual TLS)", type=Path)
    decode_workers: int = _setting(2, "threads decoding frames and encoding results")
    max_frame_pixels: int = _setting(4096 * 4096, "largest width x height a frame may declare")
    max_message_bytes: int = _setting(MAX_MESSAGE_BYTES, "gRPC message size limit", flag=False)
    warmup: bool = _setting(True, "run the model once per batch shape before reporting SERVING", flag=False)
    drift_window: int = _setting(DEFAULT_DRIFT_WINDOW, "frames per camera in the rolling drift window")
    drift_min_frames: int = _setting(DEFAULT_DRIFT_MIN_FRAMES, "frames a camera's window needs before it is scored")
    drift_psi_threshold: float = _setting(
        DEFAULT_PSI_THRESHOLD, "population stability index above which a statistic has drifted")
    drift_ks_threshold: float = _setting(DEFAULT_KS_THRESHOLD, "KS statistic above which a statistic has drifted")
    drift_max_cameras: int = _setting(
        DEFAULT_DRIFT_MAX_CAMERAS, "cameras the drift monitor tracks at once (least recently seen dropped)")
    max_metric_cameras: int = _setting(
        64, "cameras with their own Prometheus labels; the rest are aggregated as camera=\"other\"")
    max_status_cameras: int = _setting(256, "cameras one GetLineStatus answer lists (it says how many it left out)")
    coil_db: str | None = _setting(
        None, "coil tracking: SQLAlchemy URL of the coil database (sqlite:///coils.db, postgresql://user@host/db); "
        "needs --line", type=str)
    coil_spool: Path | None = _setting(
        None, "folder where coil frames wait while the database is down (default for SQLite: beside the "
        "database file, FILE.spool; required otherwise)", type=Path)
    coil_spool_mb: float = _setting(DEFAULT_COIL_SPOOL_MB, "most megabytes the coil spool holds; past it "
                                    "frames are answered UNAVAILABLE (the camera resends them)")
    coil_silence_s: float = _setting(DEFAULT_COIL_SILENCE_S, "an open coil with no frame for this many seconds "
                                     "is closed (EndCoil closes it at once)")
    grading: Path | None = _setting(
        None, "rule file: coil grades (grades:) and live alarms (alarms:), checked against the line and the "
        "model's classes at start; needs --line", type=Path)
    opcua_endpoint: str | None = _setting(
        None, "OPC UA server for the line's PLC/SCADA (opc.tcp://0.0.0.0:4840); off by default; needs --line",
        type=str)
    opcua_users: Path | None = _setting(
        None, "OPC UA users: a file of 'user:password' lines (anonymous access is off unless --opcua-anonymous)",
        type=Path)
    opcua_cert: Path | None = _setting(
        None, "OPC UA server certificate (DER or PEM) with --opcua-key: the endpoint then offers only "
        "Basic256Sha256 Sign&Encrypt (passwords and values encrypted); without: no message security", type=Path)
    opcua_key: Path | None = _setting(None, "the private key (PEM) of --opcua-cert", type=Path)
    opcua_trusted_certs: Path | None = _setting(
        None, "OPC UA certificate users: a folder of trusted client certificates (DER or PEM, or a CA that signed "
        "them); a client must present one, and may log in with it (user = its subject CN); needs --opcua-cert",
        type=Path)
    opcua_anonymous: bool = _setting(False, "allow anonymous OPC UA clients", flag=False)
    capture: CaptureConfig | None = field(default=None, metadata={"flag": False})
    #: The line's geometry (``--line line.yaml``, :mod:`coils.line`); None: GetLine says there is none.
    line: Line | None = field(default=None, metadata={"flag": False})

    def __post_init__(self) -> None:
        positive = ("max_batch", "max_inflight", "max_stream_inflight", "decode_workers", "max_frame_pixels",
                    "max_metric_cameras", "max_status_cameras")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {getattr(self, name)}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms (--max-delay-ms) must be >= 0, got {self.max_delay_ms}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port (--port) must lie in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port (--metrics-port) must lie in 0..65535, got {self.metrics_port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs TLS (--tls-cert and --tls-key)")
        check_drift_settings(self.drift_window, self.drift_min_frames, self.drift_psi_threshold,
                             self.drift_ks_threshold, self.drift_max_cameras)
        check_coil_settings(self.coil_db, self.coil_spool, self.coil_spool_mb, self.coil_silence_s, self.line)
        if self.grading is not None and self.line is None:
            raise ValueError("--grading needs --line (zones and bands are checked against the strip's width)")
        if self.opcua_endpoint is not None and self.line is None:
            raise ValueError("--opcua-endpoint needs --line (the address space has a node per camera)")
        if self.opcua_endpoint is not None and not self.opcua_endpoint.startswith("opc.tcp://"):
            raise ValueError(f"--opcua-endpoint must be an opc.tcp://HOST:PORT URL, got {self.opcua_endpoint!r}")
        if (self.opcua_cert is None) != (self.opcua_key is None):
            raise ValueError("OPC UA security needs both a certificate (--opcua-cert) and its key (--opcua-key)")
        if self.opcua_trusted_certs is not None and self.opcua_cert is None:
            raise ValueError("--opcua-trusted-certs needs an encrypted endpoint (--opcua-cert and --opcua-key)")
        if self.opcua_trusted_certs is not None and not Path(self.opcua_trusted_certs).is_dir():
            raise ValueError(f"--opcua-trusted-certs {self.opcua_trusted_certs}: no such folder")
        if (self.opcua_endpoint is not None and self.opcua_users is None and self.opcua_trusted_certs is None
                and not self.opcua_anonymous):
            raise ValueError("--opcua-endpoint needs --opcua-users FILE (user:password lines), --opcua-trusted-certs "
                             "DIR (client certificates) or --opcua-anonymous")

    def coil_tracking(self) -> CoilTrackingConfig | None:
        """The coil database and spool, resolved; None without ``--coil-db``."""
        if self.coil_db is None:
            return None
        spool = self.coil_spool
        if spool is None:
            database = sqlite_file(self.coil_db)
            assert database is not None  # checked in __post_init__
            spool = database.with_name(database.name + SQLITE_SPOOL_SUFFIX)
        return CoilTrackingConfig(self.coil_db, Path(spool), int(self.coil_spool_mb * 1e6), self.coil_silence_s)


def _flag_fields() -> list[Any]:
    return [f for f in fields(ServerConfig) if f.metadata.get("flag")]


def _flag_type(f: Any) -> Any:
    if "type" in f.metadata["argparse"]:
        return f.metadata["argparse"]["type"]
    return type(f.default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``server serve``'s ServerConfig flags, then ``--no-warmup``, drift and capture flags."""
    drift = parser.add_argument_group("drift monitoring (when the model carries a drift reference)")
    coils = parser.add_argument_group("coil tracking (with --line)")
    for f in _flag_fields():
        group = drift if f.name.startswith("drift_") else coils if f.name.startswith("coil_") else parser
        default = -1 if f.name == "metrics_port" and f.default is None else f.default
        shown = "" if default is None else " (default: %(default)s)"
        group.add_argument("--" + f.name.replace("_", "-"), type=_flag_type(f), default=default,
                           help=f.metadata["help"] + shown)
    warmup = next(f for f in fields(ServerConfig) if f.name == "warmup")
    parser.add_argument("--no-warmup", action="store_true", help=f"skip this: {warmup.metadata['help']}")
    parser.add_argument("--opcua-anonymous", action="store_true", help="allow anonymous OPC UA clients")
    parser.add_argument("--line", type=Path, default=None, metavar="FILE",
                        help="the line's geometry (line.yaml: cameras' lanes and pixel sizes, strip width, rolls); "
                        "checked before the port opens, returned by GetLine")
    add_capture_arguments(parser)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig ``add_arguments``' flags ask for.

    Raises:
        ValueError: a setting out of range (the message names its flag).
        FileNotFoundError: a TLS file or the line description is missing.
        coils.line.LineError: the line description is wrong (a ValueError naming the key and camera).
    """
    for flag in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file")
    values = {f.name: getattr(args, f.name) for f in _flag_fields()}
    if values["metrics_port"] is not None and values["metrics_port"] < 0:
        values["metrics_port"] = None
    line = load_line(args.line) if args.line is not None else None
    if args.grading is not None:
        from coils.grading import read_rules

        read_rules(args.grading)  # unreadable, not YAML, unknown top key: refused before the port opens
    return ServerConfig(**values, warmup=not args.no_warmup, capture=capture_from_args(args), line=line,
                        opcua_anonymous=args.opcua_anonymous)


def _band(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. 0.5,2), got {text!r}") from None
    return lo, hi


def add_capture_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--capture*`` flags of ``server serve`` (defaults: :class:`CaptureConfig`'s)."""
    group = parser.add_argument_group("capture for retraining")
    group.add_argument("--capture-dir", type=Path, default=None,
                       help="save chosen frames with their predictions to this Severstal-format folder")
    group.add_argument("--capture", default=None, metavar="POLICY",
                       help=f"which frames: comma-separated {', '.join(POLICY_TOKENS)} "
                       f"(default {DEFAULT_CAPTURE_POLICY})")
    group.add_argument("--capture-quota-gb", type=float, default=DEFAULT_CAPTURE_QUOTA_GB,
                       help="size limit of the capture folder, existing files included (default %(default)s)")
    group.add_argument("--capture-queue", type=int, default=DEFAULT_CAPTURE_QUEUE,
                       help="captures waiting for the disk before new ones are skipped (default %(default)s)")
    group.add_argument("--capture-uncertain-band", type=_band, default=DEFAULT_UNCERTAIN_BAND, metavar="LO,HI",
                       help="'uncertain': a class with LO..HI x its minimum area pixels (default 0.5,2)")
    group.add_argument("--capture-seed", type=int, default=0, help="seed of the 'sample' draws (default 0)")


def capture_from_args(args: argparse.Namespace) -> CaptureConfig | None:
    """The capture the ``--capture*`` flags ask for, or None without ``--capture-dir``.

    Raises:
        ValueError: a bad policy, band, quota or queue size, or ``--capture`` without ``--capture-dir``.
    """
    if args.capture_dir is None:
        if args.capture is not None:
            raise ValueError("--capture needs --capture-dir (where to save the captured frames)")
        return None
    try:
        policy = CapturePolicy.parse(args.capture or DEFAULT_CAPTURE_POLICY,
                                     uncertain_band=args.capture_uncertain_band)
    except ValueError as exc:
        raise ValueError(f"--capture/--capture-uncertain-band: {exc}") from None
    gigabytes = args.capture_quota_gb
    # Round up to one byte at least: a quota below a byte would otherwise round to an invalid 0.
    quota = max(1, int(gigabytes * 1e9)) if math.isfinite(gigabytes) and gigabytes > 0 else 0
    return CaptureConfig(Path(args.capture_dir), policy, quota_bytes=quota, queue_size=args.capture_queue,
                         seed=args.capture_seed)


__all__ = [
    "MAX_CAMERA_ID_BYTES", "MAX_COIL_ID_BYTES", "MAX_ECHO_CHARS", "MAX_MESSAGE_BYTES", "RESEND_FINAL", "RESEND_KEY", "RESEND_YES",
    "clip", "CaptureConfig", "CoilTrackingConfig", "ServerConfig", "check_coil_settings", "sqlite_file", "add_arguments",
    "add_capture_arguments", "capture_from_args", "check_capture_limits", "check_drift_settings",
    "config_from_args",
]
