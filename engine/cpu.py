"""What this CPU's matrix units can do: the one detection used by every backend, trainer and bench.

Reduced precision pays on a CPU only where it has instructions for it: bf16 dot products
(AVX-512 BF16, AMX-BF16) and int8 ones (AVX-512 VNNI / AVX-VNNI, AMX-INT8). Without them, bf16
is emulated and slower than fp32. The flags come from ``/proc/cpuinfo`` (Linux); elsewhere
nothing is assumed.

``STRIP_CPU_BF16`` forces the choice wherever precision is picked automatically: ``0`` says no (the
fp32 paths on a bf16 machine), ``1`` says yes (the bf16 paths on any CPU: torch emulates bf16
where the CPU lacks it, slowly but with the same rounding). ``STRIP_CPU_INT8`` does the same for
the automatic choice of an int8 OpenVINO IR (:mod:`engine.backends.int8`). The test suite runs with
both at ``0`` unless told otherwise, so its outcomes do not depend on the machine it lands on.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

# flag in /proc/cpuinfo -> how bench and logs name it
FLAG_NAMES: dict[str, str] = {
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
}
BF16_ENV = "STRIP_CPU_BF16"
INT8_ENV = "STRIP_CPU_INT8"


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's model name and which of :data:`FLAG_NAMES` it reports."""

    model: str
    flags: frozenset[str]

    @property
    def bf16(self) -> bool:
        """Native bf16 dot products (AVX-512 BF16 or AMX-BF16)."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def int8(self) -> bool:
        """Native int8 dot products (VNNI or AMX-INT8)."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    @property
    def amx(self) -> bool:
        return bool({"amx_bf16", "amx_int8"} & self.flags)

    def line(self) -> str:
        """``CPU <model>: AMX-BF16 yes, AMX-INT8 yes, AVX-512 BF16 yes, ...`` (bench's feature line)."""
        marks = ", ".join(f"{name} {'yes' if flag in self.flags else 'no'}" for flag, name in FLAG_NAMES.items())
        return f"CPU {self.model}: {marks}"

    def to_dict(self) -> dict[str, object]:
        return {"model": self.model, "flags": sorted(self.flags), "bf16": self.bf16, "int8": self.int8}


def parse_cpuinfo(text: str) -> CpuFeatures:
    """Features from the text of ``/proc/cpuinfo`` (the first processor's entry)."""
    model, flags = platform.processor() or "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("unknown", platform.processor()):
            model = value.strip()
        elif key == "flags":
            flags = set(value.split())
            break
    return CpuFeatures(model=model or "unknown", flags=frozenset(flags & set(FLAG_NAMES)))


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's CPU features (cached; none known off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return CpuFeatures(model=platform.processor() or "unknown", flags=frozenset())


def _forced(env: str, what: str) -> bool | None:
    """``env``: True for ``1``, False for ``0``, None when unset (detect).

    Raises:
        ValueError: any other value (a typo must not silently pick a precision).
    """
    value = os.environ.get(env, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{env}={value!r}: expected 0 ({what} off), 1 ({what} on) or unset (detect)")
    return None if value == "" else value == "1"


def bf16_forced() -> bool | None:
    """``STRIP_CPU_BF16``: True for ``1``, False for ``0``, None when unset (detect); ValueError otherwise."""
    return _forced(BF16_ENV, "bf16")


def supports_bf16() -> bool:
    """Whether the automatic choices use bf16: native bf16 here, unless ``STRIP_CPU_BF16`` forces it."""
    forced = bf16_forced()
    return cpu_features().bf16 if forced is None else forced


def no_bf16_reason() -> str:
    """Why :func:`supports_bf16` says no (for skip messages and errors)."""
    if bf16_forced() is False:
        return f"bf16 switched off by {BF16_ENV}=0"
    return f"this CPU has no native bf16 (neither AVX-512 BF16 nor AMX-BF16): {cpu_features().line()}"


def int8_forced() -> bool | None:
    """``STRIP_CPU_INT8``: True for ``1``, False for ``0``, None when unset (detect); ValueError otherwise."""
    return _forced(INT8_ENV, "int8")


def supports_int8() -> bool:
    """Whether the automatic choice may run an int8 IR: native int8 dot products here (VNNI or
    AMX-INT8, the instructions that make int8 pay), unless ``STRIP_CPU_INT8`` forces it."""
    forced = int8_forced()
    return cpu_features().int8 if forced is None else forced


def no_int8_reason() -> str:
    """Why :func:`supports_int8` says no."""
    if int8_forced() is False:
        return f"int8 switched off by {INT8_ENV}=0"
    return f"this CPU has no native int8 (neither VNNI nor AMX-INT8): {cpu_features().line()}"


def cpu_autocast_dtype(amp: bool = True) -> object | None:
    """``torch.bfloat16`` where torch on this CPU should autocast (``amp`` and native bf16), else None."""
    if not (amp and supports_bf16()):
        return None
    import torch

    return torch.bfloat16


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
