"""Integer quantization arithmetic, written out plainly (no torch.ao: deprecated in torch 2.x).

The one quantization math module: `slimserve optimize`'s layers (runtimes/quantized, used
offline and at load time) and the LLM engine's int8/int4 weights (runtimes/llm) both use it.

Conventions:
- Weights: symmetric signed int8 (zero point 0), per output channel by default:
  scale[c] = max|w[c, :]| / 127, q = round(w / scale) in [-127, 127] (not -128, so that
  negation stays representable and the range is symmetric).
- Activations (static): affine signed int8 per tensor: scale = (max - min) / 255,
  zero_point = round(-128 - min / scale) in [-128, 127], q = clamp(round(x / scale) + zp).
  The range always includes 0 so that zero (padding, ReLU output) is exact.
- Activations (dynamic): symmetric per token (per row), computed at run time.
- int4 weights (optimize's layers): symmetric signed in [-8, 7] per group of `group_size`
  inputs, two per byte.
- int4 weights (the LLM engine, `quantize_int4_affine`): asymmetric per group, levels 0..15
  with an fp16 scale and low per group, two per byte (see that function).
- Two 4-bit values a byte: the even index in the low nibble, the odd one in the high nibble.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_EPS = 1e-12  # smallest scale: keeps an all-zero channel from dividing by zero


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-bit integer."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def symmetric_scale(amax: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Scale mapping [-amax, amax] onto [-(2^(b-1)-1), 2^(b-1)-1]."""
    scale: torch.Tensor = amax.clamp_min(_EPS) / (2 ** (bits - 1) - 1)
    return scale


def affine_params(
    lo: torch.Tensor, hi: torch.Tensor, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) mapping [lo, hi] (widened to include 0) onto signed `bits` ints."""
    qmin, qmax = qrange(bits)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


QTensor = tuple[torch.Tensor, torch.Tensor]  # (integer values, scale)


def quantize_weight_per_channel(w: torch.Tensor, bits: int = 8) -> QTensor:
    """w (out, ...) float -> (q int8 same shape, scale (out,) float32), symmetric per channel."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = symmetric_scale(amax.float(), bits)
    shape = (-1,) + (1,) * (w.dim() - 1)
    limit = 2 ** (bits - 1) - 1
    q = torch.round(w.detach().float() / scale.view(shape)).clamp(-limit, limit).to(torch.int8)
    return q, scale


def quantize_weight_per_tensor(w: torch.Tensor, bits: int = 8) -> QTensor:
    """w float -> (q int8, scale (out,) float32 all equal): one scale for the whole tensor."""
    scale = symmetric_scale(w.detach().abs().amax().float(), bits)
    limit = 2 ** (bits - 1) - 1
    q = torch.round(w.detach().float() / scale).clamp(-limit, limit).to(torch.int8)
    return q, scale.expand(w.shape[0]).clone()


def quantize_rows_dynamic(x: torch.Tensor) -> QTensor:
    """x (M, K) float -> (q (M, K) int8, scale (M, 1) float32): symmetric per row (token)."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(_EPS) / 127.0
    # |x / scale| <= 127 by construction, so no clamp is needed before the cast.
    return torch.round(x / scale).to(torch.int8), scale


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """x float -> int8 with a fixed per-tensor (scale, zero_point)."""
    return torch.round(x / scale + zero_point).clamp(-128, 127).to(torch.int8)


def fake_quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int = 8
) -> torch.Tensor:
    """Quantize then dequantize, with a straight-through gradient (identity inside the range)."""
    qmin, qmax = qrange(bits)
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    dq = (q - zero_point) * scale
    # STE: forward uses dq, backward passes the gradient to x unchanged.
    return x + (dq - x).detach()


def fake_quantize_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-channel symmetric fake quantization of a weight, straight-through gradient."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = symmetric_scale(amax, bits).view((-1,) + (1,) * (w.dim() - 1))
    limit = 2 ** (bits - 1) - 1
    dq = torch.round(w / scale).clamp(-limit, limit) * scale
    return w + (dq - w).detach()


def weight_quantizer(per_channel: bool) -> Callable[[torch.Tensor], QTensor]:
    """The weight quantizer for a granularity: per output channel, or one scale per tensor."""
    return quantize_weight_per_channel if per_channel else quantize_weight_per_tensor


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32.

    torch._int_mm uses VNNI/AMX kernels on x86 CPUs and is ~5-9x faster than fp32 matmul on
    this machine (measured 128x384x1536: 0.17 ms vs 1.4 ms, 1 thread); `b` must be stored
    (K, N) row-major for that speed. Falls back to an exact float matmul where _int_mm refuses
    the shapes or device (products of int8 sum exactly in float32 up to K = 1040).
    """
    try:
        return torch._int_mm(a, b)
    except RuntimeError:
        return (a.float() @ b.float()).round().to(torch.int32)


def pack_uint4(u: torch.Tensor) -> torch.Tensor:
    """u (..., K) uint8 levels in 0..15, K even -> (..., K/2) uint8: low nibble first."""
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_uint4(p: torch.Tensor) -> torch.Tensor:
    """(..., K/2) uint8 -> (..., K) uint8 levels in 0..15 (inverse of pack_uint4)."""
    return torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (..., K) int8 in [-8, 7], K even -> (..., K/2) uint8: low nibble first."""
    return pack_uint4((q.to(torch.int16) & 0xF).to(torch.uint8))


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """(..., K/2) uint8 -> (..., K) int8 in [-8, 7] (inverse of pack_int4)."""
    q = unpack_uint4(p).to(torch.int8)
    return torch.where(q > 7, q - 16, q)


UINT4_LEVELS = 15  # asymmetric int4: q in 0..15


def quantize_int4_affine(
    weight: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (N, K) -> packed uint8 (N, K/2), scale fp16 (N, K/group), low fp16 (N, K/group).

    W is cut along K into groups of `group` weights; each group g keeps
    w ~= q * scale[g] + low[g] with q in 0..15 (asymmetric: the group's min and max map to 0
    and 15, so a group with no negative weights wastes no levels). Scale and low are fp16: with
    group 32 a weight costs 4 bits + 32 bits / 32 = 5 bits, 0.625 bytes, 16% of fp32.
    """
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group, group)  # (N, G, group)
    low = groups.amin(dim=2)
    high = groups.amax(dim=2)
    # Round the group's parameters to fp16 first, so the levels are chosen against the
    # values the reader will use.
    scale = ((high - low) / UINT4_LEVELS).clamp(min=1e-8).half()
    low16 = low.half()
    q = torch.round((groups - low16.float()[..., None]) / scale.float()[..., None])
    q = q.clamp(0, UINT4_LEVELS).to(torch.uint8).reshape(n, k)
    return pack_uint4(q).contiguous(), scale.contiguous(), low16.contiguous()


def dequantize_int4_affine(
    packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The weight (N, K) in `dtype` from its packed levels and fp16 group parameters."""
    n, groups = scale.shape
    q = unpack_uint4(packed).to(dtype).view(n, groups, -1)  # (N, G, group)
    return torch.addcmul(low.to(dtype)[..., None], q, scale.to(dtype)[..., None]).view(n, -1)
