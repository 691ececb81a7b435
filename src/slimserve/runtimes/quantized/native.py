"""Static int8 on PyTorch's own quantized CPU kernels: int8 activations flow between layers.

The "gemm" static int8 layers (layers.StaticInt8*) quantize each layer's input and hand back
float, so a small CNN pays a quantize and a dequantize per layer and runs pooling and ReLU in
float; on LeNet-5 that made int8 0.75x the speed of fp32. These layers instead take and give
`torch.quint8` tensors (per-tensor affine, uint8 in [0, 255]): ReLU is fused into the layer
(quantized::conv2d_relu / linear_relu), max pooling and flattening run on the uint8 tensor,
and only the model's input is quantized and its output dequantized.

Kernels: both layer kinds are packed by PyTorch's "x86" engine (measured per layer, 1 thread:
LeNet-5's first conv, 1 -> 6 channels, batch 256: 1.3 ms packed by x86, 1.4 ms by onednn,
27-71 ms by fbgemm; linears ~10 us at batch 1 by x86, 15 us by
onednn). The packed weights are built lazily from plain int8 buffers, so a model saves to
safetensors and loads back like the other quantized layers (see layers.QuantizedLayer.spec).

Weights: symmetric int8 in [-127, 127], per output channel or per tensor (qmath). On CPUs
without VNNI the u8 x s8 multiply-adds saturate in 16 bits, so activations then use 7 bits
(reduce_range, [0, 127]), decided where the model is quantized and kept in its ranges.

Small batches (<= 16 rows) through a Linear: the quantized kernels cost ~11 us a call however
few the rows (FBGEMM's fixed cost; onednn::qlinear_pointwise ~17 us), more than fp32's addmm
(3-6 us), so at batch 1 LeNet-5's three linears gave back what its convs won. There the layer
instead dequantizes its input to bf16 and multiplies by the same int8 weights with
aten._weight_int8pack_mm (int8 weights per output channel, bf16 activations, fp32
accumulation), bias and ReLU in place; the next Linear takes the bf16 tensor as it is, the
last returns float32. Measured, 1 thread, LeNet-5's classifier (flatten + 3 linears): batch 1
15 us against 45 us quantized; batch 16 51 against 78; batch 32 83 against 88; batch 64
105 against 72. The kernel needs bf16 hardware (avx512_bf16/amx_bf16: elsewhere it is slow)
and in_features a multiple of 16 (it returns garbage otherwise, so the weight is padded with
zero columns and the input with zeros), and each layer checks it against a float reference
once when it is built; a layer where either fails keeps the quantized kernels at every batch.

Per call at batch 1 the wrappers cost microseconds too, so each layer binds its operator and
arguments once when packing, and calls the operator's C++ entry point: torch.ops' Python
__call__ first walks the arguments looking for torch.compile's fake objects (the packed
weights are TorchBind objects), ~1.3 us a call.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.runtimes import qmath
from slimserve.runtimes.quantized.cpu import bf16_supported
from slimserve.runtimes.quantized.layers import ConvArgs, QuantizedLayer

# torch 2.13 deprecates creating quantized tensors (a C++ warn-once per process, which the
# test suite's warnings-as-errors would turn into a failure at a random first call). The
# kernels are still the fastest int8 path for small CNNs here; spend the one warning now.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)

_CONV_ENGINES = ("x86", "onednn", "qnnpack", "fbgemm")
_LINEAR_ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")
# Linear inputs of at most this many rows take the bf16 x int8-weight path (module docstring).
SMALL_BATCH_ROWS = 16

Op = Callable[..., torch.Tensor]


def _raw_op(packet: Any) -> Op:
    """The C++ operator behind torch.ops.<ns>.<name> (its Python __call__ costs ~1.3 us)."""
    return getattr(packet, "_op", packet)  # type: ignore[no-any-return]


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


@dataclass(frozen=True)
class _Packed:
    """What a layer calls, built once from its buffers (reading them at each call costs
    microseconds at batch 1)."""

    run: Callable[[torch.Tensor], torch.Tensor]  # quint8 in -> quint8 out, operator bound
    input_qparams: tuple[float, int]  # to quantize a float input (e.g. the model's input)
    small: Callable[[torch.Tensor], torch.Tensor] | None = None  # the bf16 path (Linear)
    small_numel: int = -1  # inputs of at most this many elements take `small`


class _NativeInt8(QuantizedLayer):
    """Shared state: int8 weight, float bias, calibrated input and output ranges."""

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    input_qparams: torch.Tensor
    output_qparams: torch.Tensor
    _packed: _Packed | None

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
        self._packed = None
        self.register_load_state_dict_post_hook(_drop_packed)  # type: ignore[no-untyped-call]

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

    def _bind(self, op: Op, weights: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """quint8 x -> op(x, packed weights, output scale, output zero point)."""
        scale, zp = self.output_qparams.tolist()
        zp = int(zp)
        return lambda x: op(x, weights, scale, zp)

    def _input_qparams(self) -> tuple[float, int]:
        scale, zp = self.input_qparams.tolist()
        return scale, int(zp)

    def _forward_quantized(self, packed: _Packed, x: torch.Tensor) -> torch.Tensor:
        if not x.is_quantized:  # usually the layer before hands over quint8
            scale, zp = packed.input_qparams
            x = torch.quantize_per_tensor(x.float(), scale, zp, torch.quint8)
        y = packed.run(x)
        return y.dequantize() if self.float_output else y

    def __getstate__(self) -> dict[str, Any]:  # deepcopy/pickle: the packed weights rebuild
        state = dict(self.__dict__)
        state["_packed"] = None
        return state


def _drop_packed(module: nn.Module, _incompatible: Any) -> None:
    module.__dict__["_packed"] = None  # a plain attribute, not a parameter or buffer


def _native_spec(layer: _NativeInt8) -> dict[str, Any]:
    return {"bias": layer.bias is not None, "relu": layer.relu, "float_output": layer.float_output}


@lru_cache(maxsize=1)
def bf16_int8_available() -> bool:
    """True where aten._weight_int8pack_mm multiplies bf16 natively (the small-batch path)."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm") and bf16_supported("cpu")


def _int8pack_mm() -> Op:
    """(M, K) bf16 x (N, K) int8 weight x (N,) bf16 scales -> (M, N) bf16."""
    return _raw_op(torch.ops.aten._weight_int8pack_mm)


class NativeInt8Linear(_NativeInt8):
    """nn.Linear on quint8 activations: (..., K) -> (..., N) quint8 (float if float_output).

    Inputs of at most `small_batch_rows` rows take the bf16 path (module docstring): bf16 or
    float in, bf16 out (float32 if float_output); 0 turns it off for this layer.
    """

    kind = "int8_native_linear"
    small_batch_rows = SMALL_BATCH_ROWS

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
        packed = self._packed or self._pack()
        if packed.small is not None and x.numel() <= packed.small_numel:
            return packed.small(x)
        return self._forward_quantized(packed, x)

    def _pack(self) -> _Packed:
        with _engine(_LINEAR_ENGINES):
            weights = torch.ops.quantized.linear_prepack(self._qweight(), self.bias)
        op = torch.ops.quantized.linear_relu if self.relu else torch.ops.quantized.linear
        small = self._small_path() if self.small_batch_rows > 0 else None
        self._packed = _Packed(
            run=self._bind(_raw_op(op), weights),
            input_qparams=self._input_qparams(),
            small=small,
            small_numel=self.small_batch_rows * self.in_features,
        )
        return self._packed

    def _small_path(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """(..., K) quint8/float/bf16 -> (..., N) bf16 (float32 if float_output) with
        aten._weight_int8pack_mm, or None where that kernel is missing, slow or wrong here."""
        if not bf16_int8_available():
            return None
        k, n = self.in_features, self.out_features
        pad = -k % 16  # the kernel reads K in blocks of 16; zero columns keep the sums exact
        weight = F.pad(self.qweight, (0, pad)).contiguous()  # (N, K + pad) int8
        scale = self.weight_scale.to(torch.bfloat16)  # the kernel takes bf16 scales
        bias = None if self.bias is None else self.bias.clone()
        bias16 = None if bias is None else bias.to(torch.bfloat16)
        mm, relu, float_output = _int8pack_mm(), self.relu, self.float_output

        def run(x: torch.Tensor) -> torch.Tensor:
            if x.is_quantized:
                x = x.dequantize()
            shape = x.shape
            if len(shape) != 2:
                x = x.reshape(-1, k)
            x = x.to(torch.bfloat16)
            if pad:
                x = F.pad(x, (0, pad))
            y = mm(x.contiguous(), weight, scale)  # (M, N) bf16
            if float_output:  # the model's output: float32 (bf16 + float32 bias promotes)
                y = y.float() if bias is None else torch.add(y, bias)
            elif bias16 is not None:
                y.add_(bias16)
            if relu:
                y.relu_()
            return y if len(shape) == 2 else y.reshape(*shape[:-1], n)

        return run if self._small_path_agrees(run) else None

    def _small_path_agrees(self, run: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Whether `run` matches the float product of the same int8 weights (3 random rows)."""
        x = torch.rand(3, self.in_features, generator=torch.Generator().manual_seed(0))
        weight = self.qweight.float() * self.weight_scale[:, None]
        ref = F.linear(x, weight, self.bias)
        ref = ref.relu() if self.relu else ref
        with torch.inference_mode():
            got = run(x).float()
        tolerance = 0.05 * float(ref.abs().max()) + 1e-6  # bf16 rounds to ~0.4%
        return bool(torch.isfinite(got).all()) and float((got - ref).abs().max()) <= tolerance


class NativeInt8Conv2d(_NativeInt8):
    """nn.Conv2d (zero padding) on quint8 activations: (B, C, H, W) -> (B, O, H', W')."""

    kind = "int8_native_conv2d"

    def __init__(
        self,
        *,
        groups: int = 1,
        bias: bool = True,
        relu: bool = False,
        float_output: bool = False,
        **conv: Unpack[ConvArgs],
    ) -> None:
        super().__init__()
        self.conv_args: dict[str, Any] = {**conv, "groups": groups}
        shape = (conv["out_channels"], conv["in_channels"] // groups, *conv["kernel_size"])
        self._init_native(shape, bias, relu, float_output)

    def spec(self) -> dict[str, Any]:
        return {**self.conv_args, **_native_spec(self)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed
        if packed is None:
            packed = self._pack()
            # Packed conv weights are fastest at the input shape of their first call: first
            # called at batch 256, LeNet-5's second conv then takes 35 us at batch 1 instead
            # of 18, while batch 256 costs the same either way. So the first call is always
            # one example.
            if x.shape[0] > 1:
                self._forward_quantized(packed, x[:1])
        return self._forward_quantized(packed, x)

    def _pack(self) -> _Packed:
        a = self.conv_args
        with _engine(_CONV_ENGINES):
            weights = torch.ops.quantized.conv2d_prepack(
                self._qweight(), self.bias, a["stride"], a["padding"], a["dilation"], a["groups"]
            )
        op = torch.ops.quantized.conv2d_relu if self.relu else torch.ops.quantized.conv2d
        self._packed = _Packed(
            run=self._bind(_raw_op(op), weights), input_qparams=self._input_qparams()
        )
        return self._packed


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
