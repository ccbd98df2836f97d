"""How fast this machine trains the planned network, measured in a few steps before training: what
:mod:`trainer.plan` needs to tell how many epochs a budget holds at each training scale.

Convolution cost grows with the pixels, so the probe measures seconds per pixel, once for a training
step (forward, backward, Adam) and once for an inference pass over whole frames (validation and the
BatchNorm re-estimation), and the planner multiplies them by each candidate's pixels.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from network.build import build_unet
from network.config import UNetConfig
from network.processing import network_stride, padded_logits

#: The probe's input: a batch of crops the size of the CPU crop, and whole frames of twice its area.
PROBE_BATCH = 4
PROBE_SIZE = (64, 128)
PROBE_STEPS = 2


@dataclass(frozen=True)
class Speed:
    """Seconds per input pixel of a training step and of an inference pass, on the training device."""

    train_px_s: float
    infer_px_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_speed(network: UNetConfig, device: torch.device) -> Speed:
    """Times :data:`PROBE_STEPS` training steps and inference passes of ``network`` (random weights,
    random input) after one warm-up of each."""
    torch.manual_seed(0)
    unet = build_unet(network, encoder_weights=None).to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    stride = network_stride(unet)
    x = torch.randn(PROBE_BATCH, network.in_channels, *PROBE_SIZE, device=device)
    frames = torch.randn(PROBE_BATCH, network.in_channels, PROBE_SIZE[0] * 2, PROBE_SIZE[1], device=device)

    def train_step() -> None:
        out = padded_logits(unet, x, PROBE_SIZE, stride)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        optimizer.zero_grad(set_to_none=True)
        logits.float().mean().backward()
        optimizer.step()

    def infer() -> None:
        with torch.no_grad():
            padded_logits(unet, frames, tuple(frames.shape[-2:]), stride)

    unet.train()
    train_s = _timed(train_step, device)
    unet.eval()
    infer_s = _timed(infer, device)
    return Speed(train_px_s=train_s / x[:, 0].numel(), infer_px_s=infer_s / frames[:, 0].numel())


def _timed(step, device: torch.device) -> float:
    step()  # warm-up: kernel selection, allocations
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(PROBE_STEPS):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / PROBE_STEPS
