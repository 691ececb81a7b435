"""Quantization-aware training: fake-quantized Linear/Conv2d with straight-through gradients.

prepare: each float layer becomes a FakeQuant twin sharing its parameters; training (the
train package's `fit`) sees int8 rounding in the forward pass and learns around it; convert:
each twin becomes the static int8 layer, with the input range its observer tracked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.optimize import qmath
from slimserve.optimize.qlayers import StaticInt8Conv2d, StaticInt8Linear


class _RangeTracker(nn.Module):
    """Exponential moving average of the input's min and max (momentum 0.01 per batch)."""

    lo: torch.Tensor
    hi: torch.Tensor
    seen: torch.Tensor

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            lo, hi = x.detach().min(), x.detach().max()
            if not bool(self.seen):
                self.lo.copy_(lo)
                self.hi.copy_(hi)
                self.seen.fill_(True)
            else:
                self.lo.lerp_(lo, self.momentum)
                self.hi.lerp_(hi, self.momentum)
        return qmath.affine_params(self.lo, self.hi)


class FakeQuantLinear(nn.Module):
    float_module: nn.Linear
    tracker: _RangeTracker

    def __init__(self, linear: nn.Linear, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super().__init__()
        self.float_module = linear
        self.tracker = _RangeTracker()
        self.tracker.lo.copy_(lo)
        self.tracker.hi.copy_(hi)
        self.tracker.seen.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.tracker(x)
        xq = qmath.fake_quantize_affine(x, scale, zp)
        w = qmath.fake_quantize_weight(self.float_module.weight)
        return F.linear(xq, w, self.float_module.bias)

    def convert(self, per_channel: bool) -> StaticInt8Linear:
        scale, zp = qmath.affine_params(self.tracker.lo, self.tracker.hi)
        return StaticInt8Linear.from_float(self.float_module, scale, zp, per_channel)


class FakeQuantConv2d(nn.Module):
    float_module: nn.Conv2d
    tracker: _RangeTracker

    def __init__(self, conv: nn.Conv2d, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super().__init__()
        self.float_module = conv
        self.tracker = _RangeTracker()
        self.tracker.lo.copy_(lo)
        self.tracker.hi.copy_(hi)
        self.tracker.seen.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.tracker(x)
        xq = qmath.fake_quantize_affine(x, scale, zp)
        w = qmath.fake_quantize_weight(self.float_module.weight)
        return self.float_module._conv_forward(xq, w, self.float_module.bias)

    def convert(self, per_channel: bool) -> StaticInt8Conv2d:
        scale, zp = qmath.affine_params(self.tracker.lo, self.tracker.hi)
        return StaticInt8Conv2d.from_float(self.float_module, scale, zp, per_channel)


FAKE_QUANT = (FakeQuantLinear, FakeQuantConv2d)
