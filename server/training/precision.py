"""The arithmetic a training run computes in: bf16 autocast where the hardware does bf16 natively.

`--autocast auto` (the default) trains under `torch.autocast(dtype=torch.bfloat16)` on CUDA, and
on CPUs with native bf16 dot products (x86 `avx512_bf16` or `amx_bf16`), where oneDNN runs the
LSTM's and the head's matrix products in bf16 with fp32 accumulation (about 1.8x the fp32
tokens/s of the default model on a 2-core avx512_bf16 EPYC: bench/train_bench.py). Elsewhere
(bf16 would be emulated) and with `--autocast off`, everything is fp32. Weights, gradients,
optimizer state and the loss stay fp32 either way, so checkpoints are the same format; the
carried state is kept in fp32 (the LSTM rounds it to bf16 at each chunk's end), and evaluation
on the CPU is fp32, as served. A run records the resolved choice ("bf16" or "off") in its
settings, so `--resume` continues with the arithmetic it started with.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Literal

import torch

Autocast = Literal["auto", "bf16", "off"]
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpuinfo_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor in /proc/cpuinfo text (x86 "flags", arm "Features")."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU multiplies bf16 natively (not emulated): avx512_bf16 or amx_bf16.

    Asks torch first (its own cpuinfo); falls back to /proc/cpuinfo, or to the text given.
    """
    if cpuinfo is None:
        probes = [
            getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        ]
        try:
            if any(probe is not None and probe() for probe in probes):
                return True
        except RuntimeError:
            pass
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return bool(NATIVE_BF16_FLAGS & cpuinfo_flags(cpuinfo))


def resolve_autocast(setting: str, device: torch.device, native_bf16: bool | None = None) -> str:
    """ "auto" -> "bf16" on CUDA and on CPUs with native bf16, else "off"; "bf16" and "off" stay."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu":
        return "bf16" if (cpu_has_native_bf16() if native_bf16 is None else native_bf16) else "off"
    return "off"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The forward pass's context for a resolved precision ("bf16" or "off")."""
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
