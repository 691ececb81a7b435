"""int8 for the forward's Linear layers: per-output-channel symmetric weight scales.

W (out, in) fp32 -> q = round(W / s) in int8 with s = max|W_row| / 127: a quarter of the
memory. Two ways to multiply, measured on the issue's 2-core AMD EPYC (AVX-512 VNNI), one
thread, a 576 -> 3072 layer (SmolLM2's gate/up), microseconds per call at 1 / 32 rows:

    fp32 F.linear                                   343 / 2862
    weight-only, dequantize then F.linear           393 / 3054   (no gain: the cast costs)
    weight-only, aten._weight_int8pack_mm          2505 / 77961  (slow on this build)
    dynamic int8 activations + torch._int_mm         41 /  474   (VNNI int8 GEMM)

So `int8` quantizes each activation row on the fly too (symmetric, one scale per row) and
multiplies in int8 with int32 accumulation, except in the MLP's down projection: its input
(after SwiGLU) has outlier channels, and quantizing it raised SmolLM2's perplexity on the
held-out text from 38.4 to 41.0; that one layer keeps fp32 activations and its weight
rounded to int8 levels, stored fp32 for oneDNN's packed matmul (an fp32 copy of one layer in
seven: the variant holds ~60% of fp32's weight bytes, not 25%); perplexity 38.0. Where the
CPU has avx512_bf16, that layer is kept in bf16 instead and attention and the KV cache run
in bf16 (model.bf16_linear, model.compute_dtype): perplexity 38.2, a 2048-token prefill's
down projections 505 -> ~200 ms, a 32-row decode step 86 -> 63 ms. The `int8-weight-only`
kind stores every layer in int8 (25%) and keeps fp32 activations everywhere (perplexity
38.5), dequantizing per call: the smallest, no faster than fp32; it is also what runs
where `torch._int_mm` is missing. The embedding table stays fp32 (a gather,
not a matmul); a tied head gets its own int8 copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimserve.runtimes import qmath
from slimserve.runtimes.llm.model import Linear, bf16_linear

MODES = ("dynamic", "weight-only")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight (out, in) and fp32 scale (out,) with weight ~= q * scale[:, None]."""
    q, scale = qmath.quantize_weight_per_channel(weight)
    return q.contiguous(), scale.float().contiguous()


def _has_int_mm() -> bool:
    try:
        torch._int_mm(torch.ones(1, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


HAS_INT_MM = _has_int_mm()


class Int8Linear:
    """y ~= x @ (q * scale).T; `dynamic` quantizes x per row and multiplies in int8."""

    def __init__(self, weight: torch.Tensor, mode: str = "dynamic") -> None:
        self.qweight, self.scale = quantize_per_channel(weight.float())  # (N, K), (N,)
        self.dynamic = mode == "dynamic" and HAS_INT_MM

    @classmethod
    def from_quantized(
        cls, qweight: torch.Tensor, scale: torch.Tensor, mode: str = "dynamic"
    ) -> Int8Linear:
        """From weights quantized ahead of time (a variant's int8 tensors): none re-rounded."""
        linear = cls.__new__(cls)
        linear.qweight, linear.scale = qweight.contiguous(), scale.float().contiguous()
        linear.dynamic = mode == "dynamic" and HAS_INT_MM
        return linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic:
            return F.linear(x, self.qweight.float()) * self.scale
        flat = x.reshape(-1, x.shape[-1]).float()  # (M, K); bf16 activations: scaled in fp32
        row_scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0  # (M, 1)
        xq = torch.round(flat / row_scale).to(torch.int8)
        out = torch._int_mm(xq, self.qweight.t()).float()  # (M, N), exact int32 sums
        # In place, one scale at a time: a broadcast (M, 1) * (N,) product took 4x longer.
        return out.mul_(self.scale).mul_(row_scale).view(*x.shape[:-1], -1)


def int8_linear(weight: torch.Tensor, role: str) -> Linear:
    """The int8 variant's choice per role (see the module docstring)."""
    if role != "down":
        return Int8Linear(weight, mode="dynamic")
    # Weight-only: the weight rounded to int8 levels, kept packed for oneDNN (dequantizing per
    # call made this one layer cost as much as all others); bf16 where the CPU has it
    # (activations rounded to bf16 keep the outliers' range, unlike int8 per row).
    q, scale = quantize_per_channel(weight.float())
    return bf16_linear(q.float() * scale[:, None])


def weight_only_int8(weight: torch.Tensor, role: str = "") -> Int8Linear:
    return Int8Linear(weight, mode="weight-only")


def prequantized_int8(qweight: torch.Tensor, scale: torch.Tensor, role: str, mode: str) -> Linear:
    """A layer from stored int8 weights, with the same per-role choice as `int8_linear`."""
    if mode == "dynamic" and role == "down":
        return bf16_linear(qweight.float() * scale.float()[:, None])
    return Int8Linear.from_quantized(qweight, scale, mode)
