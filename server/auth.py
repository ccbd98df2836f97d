"""Who may manage the served model: the admin role of the ``ModelControl`` service.

Inspection calls need no role (with ``--tls-client-ca`` every client, camera or admin, needs a
certificate the CA signed: the TLS handshake refuses the others). A management call is allowed when

- its client certificate's subject (as gRPC renders it, e.g. ``CN=ops,O=Mill``) or common name is
  listed in ``--admin-subjects`` (needs ``--tls-client-ca``), or
- it carries ``authorization: Bearer TOKEN`` metadata with the token of ``--admin-token-file``
  (compared in constant time), or
- neither is configured and it comes from loopback: a server without an admin role manages its
  model from its own machine only, and says so at start.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

TOKEN_KEY = "authorization"
TOKEN_SCHEME = "Bearer "


class AdminRefused(Exception):
    """A management call without the admin role; ``code`` is the gRPC status to end it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def is_loopback_peer(peer: str) -> bool:
    """Whether a gRPC peer string is local: ``ipv4:127.0.0.1:5000``, ``ipv6:%5B::1%5D:5000`` (gRPC
    percent-encodes the brackets), an IPv4-mapped loopback address, or ``unix:...``."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = urllib.parse.unquote(rest).rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _text(values: Any) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values or ()]


@dataclass(frozen=True)
class AdminPolicy:
    """The admin role's rule (see the module docstring).

    Attributes:
        subjects: certificate subjects or common names with the role.
        token: the bearer token with the role, None without one.
    """

    subjects: frozenset[str] = frozenset()
    token: bytes | None = None

    @property
    def loopback_only(self) -> bool:
        return not self.subjects and self.token is None

    def describe(self) -> str:
        """One line for the start log: how management calls are authorised."""
        if self.loopback_only:
            return ("management (ModelControl) answers loopback clients only: no --admin-subjects "
                    "(with --tls-client-ca) or --admin-token-file was given")
        ways = []
        if self.subjects:
            ways.append(f"client certificates of {len(self.subjects)} admin subject(s)")
        if self.token is not None:
            ways.append("the bearer token of --admin-token-file")
        return "management (ModelControl) needs " + " or ".join(ways)

    def authorize(self, context: grpc.aio.ServicerContext) -> str:
        """Who is calling, if they have the admin role.

        Raises:
            AdminRefused: PERMISSION_DENIED (a wrong role or token, not loopback) or UNAUTHENTICATED
                (no credential at all).
        """
        if self.loopback_only:
            peer = context.peer()
            if is_loopback_peer(peer):
                return f"loopback {peer}"
            raise AdminRefused(grpc.StatusCode.PERMISSION_DENIED,
                               "model management is open to loopback clients only on this server")
        auth = context.auth_context() or {}
        names = _text(auth.get("x509_subject")) + _text(auth.get("x509_common_name"))
        if any(name in self.subjects for name in names):
            return names[0]
        if self.token is not None:
            metadata = dict(context.invocation_metadata() or ())
            offered = str(metadata.get(TOKEN_KEY, ""))
            if offered.startswith(TOKEN_SCHEME):
                if hmac.compare_digest(offered[len(TOKEN_SCHEME):].encode(), self.token):
                    return "token"
                raise AdminRefused(grpc.StatusCode.PERMISSION_DENIED, "wrong admin token")
        if names:
            raise AdminRefused(grpc.StatusCode.PERMISSION_DENIED,
                               f"certificate {names[0]!r} does not have the admin role (--admin-subjects)")
        raise AdminRefused(grpc.StatusCode.UNAUTHENTICATED,
                           "model management needs an admin client certificate or bearer token")



def server_credentials(cfg: Any) -> grpc.ServerCredentials:
    """TLS credentials of ``cfg`` (a ServerConfig): ``--tls-cert/--tls-key``, and with ``--tls-client-ca``
    mandatory client certificates (mTLS: a client without one signed by that CA fails the handshake).

    Raises:
        FileNotFoundError: naming the flag whose file is missing.
    """
    files = {}
    for flag, path in (("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key)):
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
        files[flag] = Path(path).read_bytes()
    if cfg.tls_client_ca is None:
        return grpc.ssl_server_credentials([(files["--tls-key"], files["--tls-cert"])])
    if not Path(cfg.tls_client_ca).is_file():
        raise FileNotFoundError(f"--tls-client-ca {cfg.tls_client_ca}: no such file")
    return grpc.ssl_server_credentials([(files["--tls-key"], files["--tls-cert"])],
                                       root_certificates=Path(cfg.tls_client_ca).read_bytes(),
                                       require_client_auth=True)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model management (ModelControl): who may load, promote, roll back")
    group.add_argument("--admin-subjects", nargs="+", default=[], metavar="SUBJECT",
                       help="client certificate subjects (e.g. 'CN=ops,O=Mill') or common names with the admin "
                       "role; needs --tls-client-ca")
    group.add_argument("--admin-token-file", type=Path, default=None, metavar="FILE",
                       help="a file holding the admin bearer token (clients send 'authorization: Bearer TOKEN')")


def policy_from_args(args: argparse.Namespace) -> AdminPolicy:
    """The AdminPolicy the flags ask for.

    Raises:
        ValueError: --admin-subjects without --tls-client-ca, or an empty token file.
        FileNotFoundError: no such token file.
    """
    if args.admin_subjects and getattr(args, "tls_client_ca", None) is None:
        raise ValueError("--admin-subjects needs --tls-client-ca (the subjects come from verified client certificates)")
    token = None
    if args.admin_token_file is not None:
        if not args.admin_token_file.is_file():
            raise FileNotFoundError(f"--admin-token-file {args.admin_token_file}: no such file")
        token = args.admin_token_file.read_bytes().strip()
        if not token:
            raise ValueError(f"--admin-token-file {args.admin_token_file}: the file is empty")
    return AdminPolicy(frozenset(args.admin_subjects), token)


__all__ = ["AdminPolicy", "AdminRefused", "TOKEN_KEY", "TOKEN_SCHEME", "add_arguments", "is_loopback_peer", "server_credentials",
           "policy_from_args"]
