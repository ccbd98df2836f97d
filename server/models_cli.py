"""``server models ACTION``: manage a running server's model (the ``ModelControl`` service).

``list`` the versions and roles, ``load VERSION`` as the candidate, ``unload VERSION``,
``promote [VERSION]`` (default: the candidate), ``rollback`` to the previous production, ``audit``
the log's last entries, ``status`` of production, the candidate and its shadow run (``GetModels``),
``shadow SHARE`` to run the candidate on that share of live frames (0: off). The admin role comes from a client certificate (``--tls-cert/--tls-key``
with ``--tls-ca``) or a bearer token (``--token-file``); see docs/models.md.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

HELP = "manage a running server's model: list, load, unload, promote, rollback, audit"
ACTIONS = ("list", "load", "unload", "promote", "rollback", "audit", "status", "shadow")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    parser.add_argument("version", nargs="?", default="",
                        help="the version (load, unload, promote), or the share of frames (shadow)")
    parser.add_argument("--target", required=True, help="server address HOST:PORT")
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM root certificate: connect with TLS")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--token-file", type=Path, default=None, help="a file holding the admin bearer token")
    parser.add_argument("--last", type=int, default=20, help="audit: entries to show, 0 for all (default: 20)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the answer; a load warms the model up (default: 600)")


def _read(flag: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    return path.read_bytes()


def credentials(tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None) -> Any:
    """Channel credentials for the flags (None: plaintext).

    Raises:
        ValueError: a client certificate without TLS, or without its key.
    """
    import grpc

    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    if tls_ca is None:
        if tls_cert is not None:
            raise ValueError("--tls-cert needs --tls-ca (the server's root certificate)")
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read("--tls-ca", tls_ca),
                                        private_key=_read("--tls-key", tls_key),
                                        certificate_chain=_read("--tls-cert", tls_cert))


async def call(target: str, action: str, version: str = "", *, credentials: Any = None, token: str | None = None,
               last: int = 20, timeout: float = 600.0) -> Any:
    """Runs one management ``action`` on the server at ``target``; its answer (a ModelList or AuditLog).

    Raises:
        grpc.aio.AioRpcError: the server refused (PERMISSION_DENIED, FAILED_PRECONDITION with the reason...).
    """
    import grpc

    from protos.inspection.v1 import model_control_pb2 as mc
    from protos.inspection.v1 import model_control_pb2_grpc as mc_grpc
    from server.auth import TOKEN_KEY, TOKEN_SCHEME

    if action in ("load", "unload", "shadow") and not version:
        raise ValueError(f"{action} needs a {'SHARE' if action == 'shadow' else 'VERSION'}")
    metadata = ((TOKEN_KEY, TOKEN_SCHEME + token),) if token else None
    channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
               else grpc.aio.insecure_channel(target))
    async with channel:
        stub = mc_grpc.ModelControlStub(channel)
        requests = {
            "list": (stub.ListModels, mc.ListModelsRequest()),
            "load": (stub.LoadModel, mc.ModelRequest(version=version)),
            "unload": (stub.UnloadModel, mc.ModelRequest(version=version)),
            "promote": (stub.Promote, mc.ModelRequest(version=version)),
            "rollback": (stub.Rollback, mc.RollbackRequest()),
            "audit": (stub.GetAudit, mc.AuditRequest(last=max(0, last))),
            "status": (stub.GetModels, mc.GetModelsRequest()),
        }
        if action == "shadow":
            return await stub.SetShadow(mc.ShadowRequest(share=_share(version)), metadata=metadata, timeout=timeout)
        method, request = requests[action]
        return await method(request, metadata=metadata, timeout=timeout)


def _share(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"shadow needs a share of frames 0..1, got {text!r}") from None


def describe(answer: Any) -> str:
    """The answer as lines for a person."""
    if hasattr(answer, "shadow_share"):
        lines = [f"production {answer.production}; candidate {answer.candidate or 'none'}; shadow share "
                 f"{answer.shadow_share:g}: {answer.shadow_frames} frames, {answer.shadow_skipped} skipped, "
                 f"{answer.disagreeing_frames} disagreeing, {answer.candidate_latency_ms:.2f} ms/frame"]
        lines += [f"  {c.name:<12} presence {c.presence_agreement:.3f}  dice {c.dice:.3f} ({c.dice_frames} frames)  "
                  f"pixels +-{c.pixel_count_difference:.1f}" for c in answer.classes]
        return "\n".join(lines)
    if hasattr(answer, "entries"):
        return "\n".join(f"{e.time} {e.action:<8} {e.version or '-':<12} {e.outcome:<7} {e.who} "
                         f"sha256={e.sha256[:12] or '-'}{'  ' + e.why if e.why else ''}" for e in answer.entries)
    lines = [f"{v.version:<12} {v.role or '-':<10} {'loaded' if v.loaded else '':<6} {v.file}" for v in answer.versions]
    lines.append(f"production {answer.production}; candidate {answer.candidate or 'none'}; "
                 f"rollback to {answer.history[-1] if answer.history else 'none'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import grpc

    token = _read("--token-file", args.token_file)
    creds = credentials(args.tls_ca, args.tls_cert, args.tls_key)
    try:
        answer = asyncio.run(call(args.target, args.action, args.version, credentials=creds,
                                  token=token.decode().strip() if token else None, last=args.last,
                                  timeout=args.timeout))
    except grpc.aio.AioRpcError as exc:
        raise RuntimeError(f"{args.target}: {exc.code().name}: {exc.details()}") from None
    print(describe(answer))
    return 0
