"""What the CPU computes natively (Linux /proc/cpuinfo flags): bf16 decides kernel choices."""

from __future__ import annotations

from pathlib import Path

_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags (Linux); empty where /proc/cpuinfo is not available."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_supported(device: str = "cpu", flags: frozenset[str] | None = None) -> bool:
    """Whether `device` computes bf16 natively (CUDA: Ampere or newer)."""
    if device.startswith("cuda"):
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool((cpu_flags() if flags is None else flags) & _BF16_FLAGS)
