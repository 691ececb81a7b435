"""Weight-only int4 with a group size: two weights per byte, one scale and offset per group.

W (N, K) fp32 is cut along K into groups of `group` weights; each group g keeps
w ~= q * scale[g] + low[g] with q in 0..15 (asymmetric: the group's min and max map to 0 and
15, so a group with no negative weights wastes no levels). Scale and low are fp16: with group
32 a weight costs 4 bits + 32 bits / 32 = 5 bits, 0.625 bytes, 16% of fp32.

Packing (N, K) -> (N, K / 2) uint8: byte j of a row holds q[2j] in its low nibble and q[2j+1]
in its high nibble.

Two ways to multiply (prequant.py's docstring has the measured figures):
- `Int4Linear` keeps the packed bytes in memory and unpacks + dequantizes the whole weight on
  every call, then multiplies in fp32: the smallest resident weights, paid for in time.
- `to_int8`: dequantize once at load and requantize per output channel to int8, for the int8
  matmul (quant.Int8Linear): int8's speed and memory, int4's size on disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LEVELS = 15  # q in 0..15


def quantize_int4(
    weight: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """packed uint8 (N, K/2), scale fp16 (N, K/group), low fp16 (N, K/group)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group, group)  # (N, G, group)
    low = groups.amin(dim=2)
    high = groups.amax(dim=2)
    # Round the group's parameters to fp16 first, so the levels are chosen against the
    # values the reader will use.
    scale = ((high - low) / LEVELS).clamp(min=1e-8).half()
    low16 = low.half()
    q = torch.round((groups - low16.float()[..., None]) / scale.float()[..., None])
    q = q.clamp(0, LEVELS).to(torch.uint8).reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale.contiguous(), low16.contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 levels 0..15."""
    low_nibble = packed & 0x0F
    high_nibble = packed >> 4
    return torch.stack([low_nibble, high_nibble], dim=2).reshape(packed.shape[0], -1)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The weight (N, K) in `dtype` from its packed levels and fp16 group parameters."""
    n, groups = scale.shape
    q = unpack_int4(packed).to(dtype).view(n, groups, -1)  # (N, G, group)
    return torch.addcmul(low.to(dtype)[..., None], q, scale.to(dtype)[..., None]).view(n, -1)


class Int4Linear:
    """y = x @ W.T with W held packed (0.625 bytes a weight); W rebuilt in fp32 per call."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> None:
        self.packed, self.scale, self.low = packed, scale, low

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_int4(self.packed, self.scale, self.low, torch.float32)
        return F.linear(x, weight)
