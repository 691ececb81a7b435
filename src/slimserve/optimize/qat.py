"""Quantization-aware training: fake-quantized Linear/Conv2d with straight-through gradients.

prepare: each float layer becomes a FakeQuant twin sharing its parameters; training (the
train package's `fit`) sees int8 rounding in the forward pass and learns around it; convert:
each twin becomes the static int8 layer, with the input range its observer tracked.
Fewer bits (weight_bits / act_bits < 8) simulate lower-precision quantization for accuracy
studies (e.g. how much QAT recovers where post-training quantization loses); such twins do
not convert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.runtimes import qmath
from slimserve.runtimes.quantized.layers import StaticInt8Conv2d, StaticInt8Linear


class _RangeTracker(nn.Module):
    """Exponential moving average of the input's min and max (momentum 0.01 per batch)."""

    lo: torch.Tensor
    hi: torch.Tensor
    seen: torch.Tensor

    def __init__(self, momentum: float = 0.01, bits: int = 8) -> None:
        super().__init__()
        self.momentum, self.bits = momentum, bits
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
        return qmath.affine_params(self.lo, self.hi, self.bits)


class _FakeQuant(nn.Module):
    """A float layer run on fake-quantized inputs and weights, with its input range tracked."""

    float_module: nn.Linear | nn.Conv2d
    tracker: _RangeTracker

    def __init__(
        self,
        float_module: nn.Linear | nn.Conv2d,
        lo: torch.Tensor,
        hi: torch.Tensor,
        weight_bits: int = 8,
        act_bits: int = 8,
    ) -> None:
        super().__init__()
        self.float_module = float_module
        self.weight_bits = weight_bits
        self.tracker = _RangeTracker(bits=act_bits)
        self.tracker.lo.copy_(lo)
        self.tracker.hi.copy_(hi)
        self.tracker.seen.fill_(True)

    def _fake_quantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, weight), each quantized and dequantized, straight-through gradients."""
        scale, zp = self.tracker(x)
        xq = qmath.fake_quantize_affine(x, scale, zp, self.tracker.bits)
        return xq, qmath.fake_quantize_weight(self.float_module.weight, self.weight_bits)

    def _input_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The static int8 (scale, zero point) of the tracked input range; 8 bits only."""
        _check_int8(self)
        return qmath.affine_params(self.tracker.lo, self.tracker.hi)


class FakeQuantLinear(_FakeQuant):
    float_module: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, w = self._fake_quantized(x)
        return F.linear(xq, w, self.float_module.bias)

    def convert(self, per_channel: bool) -> StaticInt8Linear:
        scale, zp = self._input_params()
        return StaticInt8Linear.from_float(self.float_module, scale, zp, per_channel)


class FakeQuantConv2d(_FakeQuant):
    float_module: nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, w = self._fake_quantized(x)
        out: torch.Tensor = self.float_module._conv_forward(xq, w, self.float_module.bias)
        return out

    def convert(self, per_channel: bool) -> StaticInt8Conv2d:
        scale, zp = self._input_params()
        return StaticInt8Conv2d.from_float(self.float_module, scale, zp, per_channel)


FAKE_QUANT = (FakeQuantLinear, FakeQuantConv2d)


def _check_int8(twin: _FakeQuant) -> None:
    """Fewer bits than 8 are simulated only (accuracy studies): there is no kernel for them."""
    if (twin.weight_bits, twin.tracker.bits) != (8, 8):
        raise InvalidArgument(
            f"QAT with {twin.weight_bits}-bit weights and {twin.tracker.bits}-bit activations "
            "is simulated (fake quantization) only and cannot be converted to int8 layers; "
            "prepare with 8 bits to convert"
        )
