"""Weight-only int4 with a group size: two weights per byte, one scale and offset per group.

The arithmetic (asymmetric levels 0..15 per group, fp16 scale and low, packing (N, K) ->
(N, K / 2) uint8) lives in the shared quantization module, `runtimes.qmath`
(`quantize_int4_affine`, `dequantize_int4_affine`).

Two ways to multiply (prequant.py's docstring has the measured figures):
- `Int4Linear` keeps the packed bytes in memory and unpacks + dequantizes the whole weight on
  every call, then multiplies in fp32: the smallest resident weights, paid for in time.
- `to_int8`: dequantize once at load and requantize per output channel to int8, for the int8
  matmul (quant.Int8Linear): int8's speed and memory, int4's size on disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimserve.runtimes.qmath import dequantize_int4_affine


class Int4Linear:
    """y = x @ W.T with W held packed (0.625 bytes a weight); W rebuilt in fp32 per call."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> None:
        self.packed, self.scale, self.low = packed, scale, low

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_int4_affine(self.packed, self.scale, self.low, torch.float32)
        return F.linear(x, weight)
