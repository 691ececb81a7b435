"""Reduced-precision inference variants: bf16 where the hardware computes it, fp16 on CUDA.

bf16 on a CPU without bf16 instructions (AVX512_BF16 or AMX_BF16) is emulated and usually
slower than fp32, so there the variant stays fp32 and a warning says why. The check runs at
run time on the machine that makes the variant (the server should serve it on the same kind).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

from slimserve.errors import InvalidArgument
from slimserve.optimize.config import OptimizeConfig
from slimserve.runtimes.quantized.cpu import bf16_supported, cpu_flags

__all__ = [
    "Bf16",
    "Fp16",
    "Precision",
    "PrecisionFallbackWarning",
    "bf16_supported",
    "cpu_flags",
    "to_precision_",
]


class PrecisionFallbackWarning(RuntimeWarning):
    """The requested precision is not computed natively here; the variant stays float32."""


@dataclass(frozen=True)
class Precision(OptimizeConfig):
    """Cast a model's floating weights to `dtype` for inference on `device`."""

    technique: ClassVar[str] = "precision"

    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float16"):
            raise InvalidArgument(
                f"Precision: dtype={self.dtype!r} is unknown; use bfloat16 (bf16) or float16 (fp16)"
            )


def Bf16(device: str = "cpu") -> Precision:
    return Precision("bfloat16", device)


def Fp16(device: str = "cuda") -> Precision:
    return Precision("float16", device)


def resolve_dtype(config: Precision, flags: frozenset[str] | None = None) -> str:
    """The dtype to use for `config` here: the requested one, or float32 with a warning."""
    on_cuda = config.device.startswith("cuda")
    if config.dtype == "float16":
        if on_cuda:
            return "float16"
        warnings.warn(
            "fp16 inference on CPU is emulated (slow) in PyTorch; the variant stays float32. "
            "Use bf16 on a CPU with AVX512_BF16/AMX, or fp16 on CUDA.",
            PrecisionFallbackWarning,
            stacklevel=2,
        )
        return "float32"
    if bf16_supported(config.device, flags):
        return "bfloat16"
    where = "this GPU" if on_cuda else "this CPU (no avx512_bf16 or amx_bf16 flag)"
    warnings.warn(
        f"bf16 is not computed natively on {where}; the variant stays float32",
        PrecisionFallbackWarning,
        stacklevel=2,
    )
    return "float32"


def to_precision_(model, config: Precision, flags: frozenset[str] | None = None) -> str:  # type: ignore[no-untyped-def]
    """Cast `model`'s floating parameters and buffers in place; returns the dtype used.

    Integer buffers (quantized weights) keep their type: nn.Module.to(dtype) only casts
    floating tensors.
    """
    import torch

    dtype = resolve_dtype(config, flags)
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    return dtype
