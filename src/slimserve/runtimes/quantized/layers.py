"""Quantized layers that replace nn.Linear / nn.Conv2d, and their float-QAT counterparts.

Every quantized layer keeps its state in plain tensors (int8, uint8, float32 buffers), so a
quantized model saves to safetensors and loads back into an empty layer of the same `spec()`
(see variant.VariantModel). Arithmetic lives in qmath.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypedDict, Unpack

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.runtimes import qmath


class QuantizedLayer(nn.Module):
    """Base of the layers quantize_ swaps in; `spec()` rebuilds an empty twin for loading."""

    kind: ClassVar[str] = ""
    bias: torch.Tensor | None

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError


def _bias_buffer(module: nn.Module, out_features: int, bias: bool) -> None:
    module.register_buffer("bias", torch.zeros(out_features) if bias else None)


def _copy_bias(layer: QuantizedLayer, linear: nn.Linear) -> None:
    if linear.bias is not None and layer.bias is not None:
        layer.bias.copy_(linear.bias.detach())


def _linear_spec(layer: Any) -> dict[str, Any]:
    """Constructor arguments of a quantized Linear: its twin for loading is built from them."""
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
    }


class ConvArgs(TypedDict):
    """A Conv2d's geometry: the constructor arguments both int8 conv layers (static "gemm"
    and native) take, saved flat in their spec, as lists (YAML holds no tuples)."""

    in_channels: int
    out_channels: int
    kernel_size: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]


def conv_args(conv: Any) -> ConvArgs:
    """The geometry of `conv`: an nn.Conv2d with numeric padding ("same"/"valid" are refused
    before quantizing) or a quantized conv layer."""
    if isinstance(conv.padding, str):
        raise ValueError(f"string padding {conv.padding!r} is not supported")
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": list(conv.padding),
        "dilation": list(conv.dilation),
    }


class _Int8WeightLinear(QuantizedLayer):
    """The state both int8-weight Linears keep: an int8 weight buffer (named and laid out by
    the subclass, as their saved tensors are), a float scale per output channel, a bias."""

    weight_name: ClassVar[str]
    transposed: ClassVar[bool]  # stored (K, N) rather than (N, K)
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = (in_features, out_features) if self.transposed else (out_features, in_features)
        self.register_buffer(self.weight_name, torch.zeros(*shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        _bias_buffer(self, out_features, bias)

    def _load_float(self, linear: nn.Linear, per_channel: bool) -> None:
        q, scale = qmath.weight_quantizer(per_channel)(linear.weight)
        getattr(self, self.weight_name).copy_(q.t() if self.transposed else q)
        self.weight_scale.copy_(scale)
        _copy_bias(self, linear)

    def spec(self) -> dict[str, Any]:
        return _linear_spec(self)


class Int8DynamicLinear(_Int8WeightLinear):
    """int8 weights (symmetric per channel), int8 activations quantized per token at run time.

    y (M, N) = (x_q (M, K) @ w_q^T (K, N)) * s_x (M, 1) * s_w (1, N) + b
    """

    kind = "int8_dynamic"
    # Stored transposed, (K, N) row-major: the layout torch._int_mm is fast on.
    weight_name, transposed = "qweight_t", True
    qweight_t: torch.Tensor

    @classmethod
    def from_float(cls, linear: nn.Linear, per_channel: bool = True) -> Int8DynamicLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer._load_float(linear, per_channel)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xq, sx = qmath.quantize_rows_dynamic(x2)
        acc = qmath.int_matmul(xq, self.qweight_t)  # (M, N) int32
        y = acc.float() * sx * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)


class WeightOnlyInt8Linear(_Int8WeightLinear):
    """int8 weights (per channel), float activations: 4x smaller weights, float accuracy."""

    kind = "int8_weight_only"
    weight_name, transposed = "qweight", False
    qweight: torch.Tensor

    @classmethod
    def from_float(cls, linear: nn.Linear) -> WeightOnlyInt8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer._load_float(linear, per_channel=True)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # Dequantize, then a float GEMM. torch._weight_int8pack_mm (the fused kernel) measured
        # far slower on this CPU (M=32, K=400, N=120, 1 thread: 2.4 ms against 0.045 ms).
        w = self.qweight.to(x2.dtype) * self.weight_scale[:, None].to(x2.dtype)
        y = x2 @ w.t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)


class WeightOnlyInt4Linear(QuantizedLayer):
    """int4 weights, symmetric per group of `group_size` inputs, two per byte: ~7x smaller.

    The weight is dequantized at each call (memory and disk savings, not speed).
    """

    kind = "int4_weight_only"
    qweight: torch.Tensor
    group_scale: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, group_size: int = 64
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        )
        self.register_buffer("group_scale", torch.ones(out_features, groups))
        _bias_buffer(self, out_features, bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int) -> WeightOnlyInt4Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        w = linear.weight.detach().float().reshape(linear.out_features, -1, group_size)
        scale = qmath.symmetric_scale(w.abs().amax(dim=2), bits=4)  # (N, groups)
        # [-7, 7] keeps it symmetric; -8 stays unused like -128 for int8.
        q = torch.round(w / scale[..., None]).clamp(-7, 7).to(torch.int8)
        layer.qweight.copy_(qmath.pack_int4(q.reshape(linear.out_features, -1)))
        layer.group_scale.copy_(scale)
        _copy_bias(layer, linear)
        return layer

    def spec(self) -> dict[str, Any]:
        return {
            **_linear_spec(self),
            "group_size": self.group_size,
        }

    def dequantized_weight(self) -> torch.Tensor:
        q = qmath.unpack_int4(self.qweight).reshape(self.out_features, -1, self.group_size)
        return (q.float() * self.group_scale[..., None]).reshape(self.out_features, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)


class _StaticInput(QuantizedLayer):
    """Shared state of static int8 layers: a calibrated per-tensor affine input range."""

    input_scale: torch.Tensor
    input_zero_point: torch.Tensor
    qweight_t: torch.Tensor
    weight_scale: torch.Tensor
    weight_colsum: torch.Tensor

    def _init_static(self, k: int, n: int, bias: bool) -> None:
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros(()))
        self.register_buffer("qweight_t", torch.zeros(k, n, dtype=torch.int8))  # (K, N)
        self.register_buffer("weight_scale", torch.ones(n))
        # sum_k w_q[k, n]: the zero-point correction, so the int GEMM runs on raw x_q.
        self.register_buffer("weight_colsum", torch.zeros(n, dtype=torch.int32))
        _bias_buffer(self, n, bias)

    def _load_float(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        per_channel: bool,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
    ) -> None:
        quant = qmath.weight_quantizer(per_channel)
        q, ws = quant(weight)
        q2 = q.reshape(q.shape[0], -1).t().contiguous()  # (K, N)
        self.qweight_t.copy_(q2)
        self.weight_scale.copy_(ws)
        self.weight_colsum.copy_(q2.to(torch.int32).sum(dim=0))
        self.input_scale.copy_(scale.reshape(()))
        self.input_zero_point.copy_(zero_point.reshape(()))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.detach())

    def _gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) float -> (M, N) float through int8 x int8 -> int32.

        y = s_x * s_w * (x_q @ w_q - zp_x * colsum(w_q)) + b
        """
        xq = qmath.quantize_affine(x2, self.input_scale, self.input_zero_point)
        acc = qmath.int_matmul(xq, self.qweight_t)
        acc = acc - self.input_zero_point.to(torch.int32) * self.weight_colsum
        y = acc.float() * (self.input_scale * self.weight_scale)
        return y if self.bias is None else y + self.bias


class StaticInt8Linear(_StaticInput):
    kind = "int8_static_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_static(in_features, out_features, bias)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        per_channel: bool = True,
    ) -> StaticInt8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer._load_float(linear.weight, linear.bias, per_channel, scale, zero_point)
        return layer

    def spec(self) -> dict[str, Any]:
        return _linear_spec(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._gemm(x.reshape(-1, self.in_features))
        return y.to(x.dtype).reshape(*lead, self.out_features)


class StaticInt8Conv2d(_StaticInput):
    """Conv2d (groups=1) as im2col + int8 GEMM: (B, C, H, W) -> (B, O, H', W')."""

    kind = "int8_static_conv2d"

    def __init__(self, *, bias: bool = True, **conv: Unpack[ConvArgs]) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv["in_channels"], conv["out_channels"]
        self.kernel_size, self.stride = tuple(conv["kernel_size"]), tuple(conv["stride"])
        self.padding, self.dilation = tuple(conv["padding"]), tuple(conv["dilation"])
        k = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_static(k, self.out_channels, bias)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        per_channel: bool = True,
    ) -> StaticInt8Conv2d:
        layer = cls(bias=conv.bias is not None, **conv_args(conv))
        layer._load_float(conv.weight, conv.bias, per_channel, scale, zero_point)
        return layer

    def spec(self) -> dict[str, Any]:
        return {**conv_args(self), "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize the input first (C*H*W values per image, not C*KH*KW*L), pad with the zero
        point (the quantized 0), gather int8 patches through a strided view, one int8 GEMM
        W_q (O, K) @ patches (K, B*L), which leaves the output channel-major.

        Measured on LeNet-5, batch 256, 1 thread: float F.unfold then quantize took 63 ms (75%
        in im2col and element-wise passes over the 25x larger float patch matrix); gathering
        int8 patches as (B*L, K) took 35 ms; as (K, B*L) (inner runs along the image rows)
        about half that again.
        """
        xq = qmath.quantize_affine(x, self.input_scale, self.input_zero_point)  # (B, C, H, W)
        ph, pw = self.padding
        if ph or pw:
            xq = F.pad(xq, (pw, pw, ph, ph), value=int(self.input_zero_point))
        cols, (b, oh, ow) = self._patches(xq)  # (C*KH*KW, B*OH*OW) int8
        acc = qmath.int_matmul(self.qweight_t.t(), cols)  # (O, B*OH*OW) int32
        acc = acc - self.input_zero_point.to(torch.int32) * self.weight_colsum[:, None]
        y = acc.float() * (self.input_scale * self.weight_scale)[:, None]
        if self.bias is not None:
            y = y + self.bias[:, None]
        # (O, B, OH, OW) viewed as (B, O, OH, OW): no copy
        return y.view(self.out_channels, b, oh, ow).permute(1, 0, 2, 3).to(x.dtype)

    def _patches(self, xq: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """im2col by strides: (B, C, H, W) -> (C*KH*KW, B*OH*OW), K ordered (c, kh, kw) like
        the weight's reshape (O, C*KH*KW)."""
        b, c, h, w = xq.shape
        kh, kw = self.kernel_size
        (sh, sw), (dh, dw) = self.stride, self.dilation
        oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        st = xq.stride()
        view = xq.as_strided(
            (c, kh, kw, b, oh, ow),
            (st[1], st[2] * dh, st[3] * dw, st[0], st[2] * sh, st[3] * sw),
        )
        return view.reshape(c * kh * kw, b * oh * ow), (b, oh, ow)


GEMM_KINDS: dict[str, type[QuantizedLayer]] = {
    cls.kind: cls
    for cls in (
        Int8DynamicLinear,
        WeightOnlyInt8Linear,
        WeightOnlyInt4Linear,
        StaticInt8Linear,
        StaticInt8Conv2d,
    )
}
