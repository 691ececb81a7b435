"""Weight-only int8 for the forward's Linear layers: per-output-channel symmetric scales.

W (out, in) fp32 -> q = round(W / s) in int8 with s = max|W_row| / 127, so the weights take a
quarter of the memory. The matmul uses torch's CPU kernel for int8 weights and float
activations (`aten._weight_int8pack_mm`, which scales the int32-free fp32 accumulation per
output channel) where it is available, else dequantizes on the fly. The embedding table stays
fp32 (a gather, not a matmul); a tied head gets its own int8 copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight (out, in) and fp32 scale (out,) with weight ~= q * scale[:, None]."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.float().contiguous()


def _has_int8pack() -> bool:
    try:
        x, w, s = torch.ones(1, 32), torch.ones(8, 32, dtype=torch.int8), torch.ones(8)
        torch.ops.aten._weight_int8pack_mm(x, w, s)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


class Int8Linear:
    """y = x @ (q * scale).T without materializing the fp32 weight when the kernel exists."""

    fused = _has_int8pack()

    def __init__(self, weight: torch.Tensor) -> None:
        self.qweight, self.scale = quantize_per_channel(weight.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            flat = x.reshape(-1, x.shape[-1])
            out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
            return out.view(*x.shape[:-1], -1)
        return F.linear(x, self.qweight.float()) * self.scale
