"""Pretrained encoder weights: fail fast, with advice, when they can be neither found nor fetched.

smp fetches encoder weights from the Hugging Face hub; without the probe an offline machine would
wait on network timeouts and end in a traceback.
"""

from __future__ import annotations

import socket
import urllib.request
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
from huggingface_hub import constants, try_to_load_from_cache

from network.build import build_unet
from network.config import ENCODERS

if TYPE_CHECKING:
    from torch import nn

    from network.config import UNetConfig


def check_pretrained_reachable(
    encoder: str, weights: str = "imagenet", timeout: float = 3.0, endpoint: str | None = None,
    cache_dir: str | None = None,
) -> None:
    """Returns when the weights are cached or the hub (or its proxy) answers a TCP connection.

    Raises:
        RuntimeError: the weights are not cached and the hub (or the proxy) cannot be reached.
        ValueError: the encoder has no such weights.
    """
    settings = smp.encoders.encoders[ENCODERS[encoder]]["pretrained_settings"].get(weights)
    if settings is None:
        raise ValueError(f"encoder {encoder} has no {weights!r} weights; use --encoder-weights none")
    repo, revision = settings["repo_id"], settings.get("revision")
    cached = all(
        isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision), str)
        for name in ("config.json", "model.safetensors")
    )
    if cached:
        return
    endpoint = endpoint or constants.ENDPOINT
    proxy = urllib.request.getproxies().get(urlparse(endpoint).scheme)
    target = urlparse(proxy if proxy else endpoint)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except OSError as exc:
        via = f" through the proxy {proxy}" if proxy else ""
        raise RuntimeError(
            f"--encoder-weights {weights}: the {encoder} weights ({repo}) are not in the Hugging Face cache and "
            f"{endpoint} cannot be reached{via} ({exc}). Use --encoder-weights none to train from random "
            "initialisation, or download the weights once on a machine with internet access into the cache "
            "(HF_HOME)."
        ) from None


def build_pretrained_unet(ucfg: UNetConfig, weights: str) -> nn.Module:
    """The U-Net with ``weights`` (e.g. ``imagenet``) in its encoder, or a clear error why not."""
    check_pretrained_reachable(ucfg.encoder, weights)
    try:
        return build_unet(ucfg, encoder_weights=weights)
    except Exception as exc:  # noqa: BLE001 - downloads fail in many ways; all mean the same to the user
        raise RuntimeError(
            f"--encoder-weights {weights}: loading the {ucfg.encoder} weights failed "
            f"({type(exc).__name__}: {exc}); use --encoder-weights none to train from random initialisation"
        ) from None
