"""Static int8 on PyTorch's own quantized CPU kernels: int8 activations flow between layers.

The "gemm" static int8 layers (qlayers.StaticInt8*) quantize each layer's input and hand back
float, so a small CNN pays a quantize and a dequantize per layer and runs pooling and ReLU in
float; on LeNet-5 that made int8 0.75x the speed of fp32. These layers instead take and give
`torch.quint8` tensors (per-tensor affine, uint8 in [0, 255]): ReLU is fused into the layer
(quantized::conv2d_relu / linear_relu), max pooling and flattening run on the uint8 tensor,
and only the model's input is quantized and its output dequantized.

Kernels: both layer kinds are packed by PyTorch's "x86" engine (measured per layer, 1 thread:
LeNet-5's first conv, 1 -> 6 channels, batch 256: 1.3 ms packed by x86, 1.4 ms by onednn,
27-71 ms by fbgemm; linears ~10 us at batch 1 by x86, 15 us by
onednn). The packed weights are built lazily from plain int8 buffers, so a model saves to
safetensors and loads back like the other quantized layers (see qlayers.QuantizedLayer.spec).

Weights: symmetric int8 in [-127, 127], per output channel or per tensor (qmath). On CPUs
without VNNI the u8 x s8 multiply-adds saturate in 16 bits, so activations then use 7 bits
(reduce_range, [0, 127]), decided where the model is quantized and kept in its ranges.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimserve.optimize import qmath
from slimserve.optimize.qlayers import LAYER_KINDS, QuantizedLayer

# torch 2.13 deprecates creating quantized tensors (a C++ warn-once per process, which the
# test suite's warnings-as-errors would turn into a failure at a random first call). The
# kernels are still the fastest int8 path for small CNNs here; spend the one warning now.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)

_CONV_ENGINES = ("x86", "onednn", "qnnpack", "fbgemm")
_LINEAR_ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")


@lru_cache(maxsize=1)
def has_vnni() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: assume the cautious path
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def native_available() -> bool:
    """True when this torch build has quantized CPU engines for both layer kinds."""
    engines = set(torch.backends.quantized.supported_engines)
    return bool(engines & set(_CONV_ENGINES)) and bool(engines & set(_LINEAR_ENGINES))


@contextlib.contextmanager
def _engine(preferred: tuple[str, ...]) -> Iterator[None]:
    """Pack weights under the first supported engine; the packed object keeps its kernels."""
    supported = torch.backends.quantized.supported_engines
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = next(e for e in preferred if e in supported)
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor, reduce_range: bool) -> tuple[float, int]:
    """(scale, zero point) of a quint8 tensor covering [lo, hi] (widened to include 0).

    Same arithmetic as the signed int8 activations (qmath.affine_params), shifted to unsigned:
    zp_u8 = zp_s8 + 128 (or + 64 on 7 bits).
    """
    bits = 7 if reduce_range else 8
    scale, zp = qmath.affine_params(lo.float(), hi.float(), bits=bits)
    return float(scale), int(zp) + 2 ** (bits - 1)


class _NativeInt8(QuantizedLayer):
    """Shared state: int8 weight, float bias, calibrated input and output ranges."""

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    input_qparams: torch.Tensor
    output_qparams: torch.Tensor

    def _init_native(
        self, weight_shape: tuple[int, ...], bias: bool, relu: bool, float_output: bool
    ) -> None:
        self.relu, self.float_output = relu, float_output
        n = weight_shape[0]
        self.register_buffer("qweight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n) if bias else None)
        # (scale, zero point) as float32 pairs: the input's (used when a float tensor arrives,
        # e.g. the model's input) and the output's.
        self.register_buffer("input_qparams", torch.tensor([1.0, 0.0]))
        self.register_buffer("output_qparams", torch.tensor([1.0, 0.0]))
        self._packed: Any = None
        self.register_load_state_dict_post_hook(_drop_packed)

    def load_float(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        per_channel: bool,
        input_qparams: tuple[float, int],
        output_qparams: tuple[float, int],
    ) -> None:
        q, scale = qmath.weight_quantizer(per_channel)(weight)
        self.qweight.copy_(q)
        self.weight_scale.copy_(scale)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.detach())
        self.input_qparams.copy_(torch.tensor(input_qparams, dtype=torch.float32))
        self.output_qparams.copy_(torch.tensor(output_qparams, dtype=torch.float32))
        self._packed = None

    def _qweight(self) -> torch.Tensor:
        """The weight as a torch.qint8 tensor (per channel; per tensor is equal scales)."""
        zeros = torch.zeros(len(self.weight_scale), dtype=torch.long)
        return torch._make_per_channel_quantized_tensor(
            self.qweight, self.weight_scale.double(), zeros, 0
        )

    def _pack(self, weights: Any) -> None:
        """Cache (packed weights, input (scale, zp), output (scale, zp)) as Python numbers:
        reading them from the buffers at every call costs microseconds at batch 1."""
        (si, zi), (so, zo) = self.input_qparams.tolist(), self.output_qparams.tolist()
        self._packed = (weights, (si, int(zi)), (so, int(zo)))

    def _quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_quantized:  # the usual case: the layer before handed over quint8
            return x
        scale, zp = self._packed[1]
        return torch.quantize_per_tensor(x.float(), scale, zp, torch.quint8)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        return y.dequantize() if self.float_output else y

    def __getstate__(self) -> dict[str, Any]:  # deepcopy/pickle: the packed weights rebuild
        state = dict(self.__dict__)
        state["_packed"] = None
        return state


def _drop_packed(module: nn.Module, _incompatible: Any) -> None:
    module.__dict__["_packed"] = None  # a plain attribute, not a parameter or buffer


def _native_spec(layer: _NativeInt8) -> dict[str, Any]:
    return {"bias": layer.bias is not None, "relu": layer.relu, "float_output": layer.float_output}


class NativeInt8Linear(_NativeInt8):
    """nn.Linear on quint8 activations: (..., K) -> (..., N) quint8 (float if float_output)."""

    kind = "int8_native_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        relu: bool = False,
        float_output: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_native((out_features, in_features), bias, relu, float_output)

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            **_native_spec(self),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            with _engine(_LINEAR_ENGINES):
                self._pack(torch.ops.quantized.linear_prepack(self._qweight(), self.bias))
        weights, (scale, zp) = self._packed[0], self._packed[2]
        op = torch.ops.quantized.linear_relu if self.relu else torch.ops.quantized.linear
        return self._finish(op(self._quantized_input(x), weights, scale, zp))


class NativeInt8Conv2d(_NativeInt8):
    """nn.Conv2d (zero padding) on quint8 activations: (B, C, H, W) -> (B, O, H', W')."""

    kind = "int8_native_conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int = 1,
        bias: bool = True,
        relu: bool = False,
        float_output: bool = False,
    ) -> None:
        super().__init__()
        self.conv_args = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "kernel_size": list(kernel_size),
            "stride": list(stride),
            "padding": list(padding),
            "dilation": list(dilation),
            "groups": groups,
        }
        shape = (out_channels, in_channels // groups, *kernel_size)
        self._init_native(shape, bias, relu, float_output)

    def spec(self) -> dict[str, Any]:
        return {**self.conv_args, **_native_spec(self)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            a = self.conv_args
            with _engine(_CONV_ENGINES):
                self._pack(
                    torch.ops.quantized.conv2d_prepack(
                        self._qweight(),
                        self.bias,
                        a["stride"],
                        a["padding"],
                        a["dilation"],
                        a["groups"],
                    )
                )
            # Packed conv weights are fastest at the input shape of their first call: first
            # called at batch 256, LeNet-5's second conv then takes 35 us at batch 1 instead
            # of 18, while batch 256 costs the same either way. So the first call is always
            # one example.
            if x.shape[0] > 1:
                self._run(x[:1])
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        weights, (scale, zp) = self._packed[0], self._packed[2]
        op = torch.ops.quantized.conv2d_relu if self.relu else torch.ops.quantized.conv2d
        return self._finish(op(self._quantized_input(x), weights, scale, zp))


class FusedAway(QuantizedLayer):
    """Stands where a ReLU was that the layer before it now applies (relu=True): identity."""

    kind = "fused_away"

    def spec(self) -> dict[str, Any]:
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


NATIVE_KINDS: dict[str, type[QuantizedLayer]] = {
    cls.kind: cls for cls in (NativeInt8Linear, NativeInt8Conv2d, FusedAway)
}
LAYER_KINDS.update(NATIVE_KINDS)  # so VariantModel rebuilds these layers when loading
