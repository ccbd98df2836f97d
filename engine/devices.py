"""Device strings, parsed in one place: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; and the error a
backend raises when the device (or its runtime) is not here.

Every backend, ``trainer fit/evaluate/export`` and the benchmarks take a device string; this
module turns it into a typed :class:`Device`, and (for torch users) into the device to run on.
Nothing else looks inside a device string. torch is imported only by :func:`torch_device`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("auto", "cpu", "cuda")
CHOICES_TEXT = "auto, cpu, cuda or cuda:N"


class BackendUnavailable(RuntimeError):
    """A backend cannot run on this machine; the message says why and how to fix it."""


@dataclass(frozen=True)
class Device:
    """A parsed device string.

    Attributes:
        kind: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
        index: the CUDA device index (0 unless ``cuda:N`` named another; 0 for cpu/auto too).
        explicit_index: whether the string named the index (``cuda:0`` versus ``cuda``).
    """

    kind: str
    index: int = 0
    explicit_index: bool = False

    @property
    def is_auto(self) -> bool:
        return self.kind == "auto"

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind


def parse_device(text: str | Device, flag: str = "device") -> Device:
    """``"auto"``/``"cpu"``/``"cuda"``/``"cuda:N"`` (any case, spaces around) -> :class:`Device`.

    Raises:
        ValueError: anything else, naming ``flag`` and the accepted forms.
    """
    if isinstance(text, Device):
        return text
    value = str(text).strip().lower()
    if value in KINDS:
        return Device(value)
    kind, sep, index = value.partition(":")
    if kind == "cuda" and sep and index.isdigit():
        return Device("cuda", int(index), explicit_index=True)
    raise ValueError(f"{flag} must be {CHOICES_TEXT}, got {str(text)!r}")


def resolve_torch_device(device: str | Device, cuda_available: bool, cuda_count: int = 1) -> str:
    """The device torch runs on (``cpu`` or ``cuda:N``); pure, so testable without a GPU.

    Raises:
        ValueError: not a device string.
        BackendUnavailable: CUDA asked for but missing.
    """
    parsed = parse_device(device)
    if parsed.is_auto:
        return "cuda:0" if cuda_available else "cpu"
    if parsed.is_cpu:
        return "cpu"
    if not cuda_available:
        raise BackendUnavailable(
            f"device {str(device)!r} asked for, but torch here sees no CUDA GPU (torch.cuda.is_available() is "
            "False): install a CUDA build of torch on a machine with an NVIDIA GPU, or use device='cpu'"
        )
    if parsed.index >= cuda_count:
        raise BackendUnavailable(f"device {str(device)!r} asked for, but torch sees only {cuda_count} CUDA device(s)")
    return str(parsed)


def is_cuda(device: str | Device) -> bool:
    """Whether ``device`` names a CUDA device (``cuda``, ``cuda:N``; not ``auto``)."""
    return parse_device(device).is_cuda


def cuda_index(device: str | Device) -> int:
    """The CUDA device index ``device`` names (0 for ``cuda``).

    Raises:
        ValueError: not a CUDA device string.
    """
    parsed = parse_device(device)
    if not parsed.is_cuda:
        raise ValueError(f"{str(device)!r} is not a CUDA device")
    return parsed.index


def torch_device(device: str | Device) -> Any:
    """:func:`resolve_torch_device` on this machine, as a ``torch.device``."""
    import torch

    return torch.device(resolve_torch_device(device, torch.cuda.is_available(), torch.cuda.device_count()))
