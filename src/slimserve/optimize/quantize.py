"""`quantize_(model, config, filter_fn=None)`: one frozen config per method, swapped in place.

Methods (torch.ao.quantization is deprecated in torch 2.x, so the int8 layers are our own,
see qlayers and qmath):
- DynamicInt8: int8 weights per channel, activations quantized per token at run time.
- StaticInt8: int8 weights, input ranges calibrated on data (minmax | percentile | entropy).
- WeightOnlyInt8 / WeightOnlyInt4(group_size): weights only, for Linear-heavy and language models.
- QAT: fake-quantize, fine-tune with slimserve.train.fit, convert to StaticInt8 layers.
For ONNX artifacts use quantize_onnx (ONNX Runtime's quantizers, QDQ, signed int8).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from slimserve.errors import InvalidArgument
from slimserve.optimize import quantize_native as qn
from slimserve.optimize.calibrate import OBSERVERS
from slimserve.optimize.config import OptimizeConfig
from slimserve.optimize.onnx_quant import quantize_onnx
from slimserve.optimize.qat import FAKE_QUANT, FakeQuantConv2d, FakeQuantLinear
from slimserve.runtimes.quantized import layers as qlayers
from slimserve.train.loop import TrainConfig, classification_loss, fit

FilterFn = Callable[[nn.Module, str], bool]

__all__ = [
    "QAT",
    "DynamicInt8",
    "StaticInt8",
    "WeightOnlyInt4",
    "WeightOnlyInt8",
    "quantize_",
    "quantize_onnx",
    "quantized_layers",
]


_KERNELS = ("auto", "native", "gemm")


def _check_kernel(method: str, kernel: str) -> None:
    if kernel not in _KERNELS:
        raise InvalidArgument(
            f"{method}: kernel={kernel!r} is unknown; use one of {', '.join(_KERNELS)}"
        )


@dataclass(frozen=True)
class _Int8Config(OptimizeConfig):
    """An int8 method: `bits` is there to be refused with a pointer to the int4 method."""

    bits: int = field(default=8, kw_only=True)

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise InvalidArgument(
                f"{type(self).__name__}: bits={self.bits} is not supported: int8 methods use "
                "8 bits; for 4-bit weights use WeightOnlyInt4 (recipe step int4:group=64)"
            )


@dataclass(frozen=True)
class DynamicInt8(_Int8Config):
    """int8 weights (symmetric, per channel or per tensor) and per-token dynamic activations."""

    technique: ClassVar[str] = "int8"

    per_channel: bool = True


@dataclass(frozen=True)
class StaticInt8(_Int8Config):
    """int8 weights and inputs; input ranges from calibration data (quantize_(..., data=))."""

    technique: ClassVar[str] = "static-int8"

    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    per_channel: bool = True
    percentile: float = 99.99
    max_batches: int = 32
    # ONNX models only: quantize just these op types, e.g. ("Gemm", "MatMul"); None: all.
    onnx_op_types: tuple[str, ...] | None = None
    # torch models: "native" = PyTorch's quantized kernels with quint8 activations flowing
    # between layers, ReLU fused (qnative; LeNet-5, 1 thread: ~2x fp32's speed at batch
    # 64-256, 1.14x at batch 1); "gemm" = our int8 GEMM layers that take and give float (any
    # graph, but slower than fp32 on small CNNs); "auto" = native when the model's graph
    # carries quint8 tensors, else gemm.
    kernel: Literal["auto", "native", "gemm"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_kernel("StaticInt8", self.kernel)
        if self.calibration not in OBSERVERS:
            raise InvalidArgument(
                f"StaticInt8: calibration={self.calibration!r} is unknown; "
                f"use one of {', '.join(OBSERVERS)}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise InvalidArgument(
                f"StaticInt8: percentile={self.percentile} must be in (50, 100], e.g. 99.99"
            )


@dataclass(frozen=True)
class WeightOnlyInt8(_Int8Config):
    technique: ClassVar[str] = "weight-int8"


@dataclass(frozen=True)
class WeightOnlyInt4(OptimizeConfig):
    technique: ClassVar[str] = "int4"
    group_size: int = 64
    # Leave Linear layers whose input count is not a multiple of group_size in float (else
    # such a layer is an error naming the group sizes that would fit).
    skip_indivisible: bool = False

    def __post_init__(self) -> None:
        if self.group_size not in (32, 64, 128):
            raise InvalidArgument(
                f"WeightOnlyInt4: group_size={self.group_size} is not supported; use 32, 64 or 128"
            )


@dataclass(frozen=True)
class QAT(OptimizeConfig):
    """Quantization-aware fine-tuning, then conversion to static int8 layers."""

    technique: ClassVar[str] = "qat"

    epochs: int = 1
    lr: float = 1e-4
    per_channel: bool = True
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    fit_options: dict[str, Any] = field(default_factory=dict)
    kernel: Literal["auto", "native", "gemm"] = "auto"  # of the int8 layers: see StaticInt8

    def __post_init__(self) -> None:
        _check_kernel("QAT", self.kernel)
        if self.epochs < 0 or not 0 < self.lr < 1:
            raise InvalidArgument(
                f"QAT: epochs={self.epochs}, lr={self.lr}: use epochs >= 0 and 0 < lr < 1"
            )


# --- layer selection and swapping -------------------------------------------------------------


def _linear_only(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _linear_or_conv(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d)


def _select(model: nn.Module, filter_fn: FilterFn, what: str) -> list[tuple[str, nn.Module]]:
    chosen = [(n, m) for n, m in model.named_modules() if n and filter_fn(m, n)]
    if not chosen:
        raise InvalidArgument(
            f"{what}: no layer of {type(model).__name__} to quantize (none matched the filter); "
            "these methods handle nn.Linear (and nn.Conv2d for static int8 and QAT)"
        )
    return chosen


def _set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{layer path: {"kind": ..., **constructor args}} of every quantized layer (for loading)."""
    return {
        name: {"kind": m.kind, **m.spec()}
        for name, m in model.named_modules()
        if isinstance(m, qlayers.QuantizedLayer)
    }


def _require_linear(name: str, m: nn.Module, method: str) -> nn.Linear:
    if not isinstance(m, nn.Linear):
        raise InvalidArgument(
            f"{method}: layer '{name}' is a {type(m).__name__}; this method handles nn.Linear "
            "only; pass a filter_fn that selects Linear layers, or use StaticInt8 for Conv2d"
        )
    return m


# --- handlers, one per config type ------------------------------------------------------------


def _dynamic(model: nn.Module, cfg: DynamicInt8, filter_fn: FilterFn, data: Any) -> None:
    for name, m in _select(model, filter_fn, "DynamicInt8"):
        lin = _require_linear(name, m, "DynamicInt8")
        _set_module(model, name, qlayers.Int8DynamicLinear.from_float(lin, cfg.per_channel))


def _weight_int8(model: nn.Module, cfg: WeightOnlyInt8, filter_fn: FilterFn, data: Any) -> None:
    for name, m in _select(model, filter_fn, "WeightOnlyInt8"):
        lin = _require_linear(name, m, "WeightOnlyInt8")
        _set_module(model, name, qlayers.WeightOnlyInt8Linear.from_float(lin))


def _weight_int4(model: nn.Module, cfg: WeightOnlyInt4, filter_fn: FilterFn, data: Any) -> None:
    chosen = []
    for name, m in _select(model, filter_fn, "WeightOnlyInt4"):  # check all before changing any
        lin = _require_linear(name, m, "WeightOnlyInt4")
        if lin.in_features % cfg.group_size == 0:
            chosen.append((name, lin))
        elif not cfg.skip_indivisible:
            fits = [g for g in (32, 64, 128) if lin.in_features % g == 0]
            raise InvalidArgument(
                f"WeightOnlyInt4: layer '{name}' has {lin.in_features} inputs, not a multiple "
                f"of group_size {cfg.group_size}; use group_size in {fits or '(none fits)'}, "
                "leave the layer out with filter_fn, or keep such layers in float with "
                "skip_indivisible=True (recipe: int4:group=32,skip_indivisible=true)"
            )
    if not chosen:
        raise InvalidArgument(
            f"WeightOnlyInt4: no Linear layer has an input count divisible by {cfg.group_size}"
        )
    for name, lin in chosen:
        _set_module(model, name, qlayers.WeightOnlyInt4Linear.from_float(lin, cfg.group_size))


def _check_static_layer(name: str, m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and (
        m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)
    ):
        raise InvalidArgument(
            f"static int8: layer '{name}' is a Conv2d with groups={m.groups}, "
            f"padding={m.padding!r}, padding_mode={m.padding_mode!r}; only groups=1 with "
            "numeric zero padding is handled; leave it out with filter_fn or export to ONNX "
            "and use quantize_onnx"
        )
    if not isinstance(m, nn.Linear | nn.Conv2d):
        raise InvalidArgument(
            f"static int8: layer '{name}' is a {type(m).__name__}; only nn.Linear and "
            "nn.Conv2d are handled; narrow filter_fn"
        )


def _batches(data: Any, what: str, batch_size: int = 64) -> Iterable[Any]:
    """Calibration batches from a tensor/array of inputs, an (inputs, labels) tuple, or an
    iterable of batches (tensors or (inputs, labels) pairs)."""
    if data is None:
        raise InvalidArgument(
            f"{what} needs calibration data: quantize_(model, config, data=...) with an input "
            "tensor, an (inputs, labels) tuple, or an iterable of batches (--data on the "
            "command line)"
        )
    if isinstance(data, tuple) and data and hasattr(data[0], "shape"):
        data = data[0]
    if hasattr(data, "shape"):
        x = torch.as_tensor(data)
        return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    return cast(Iterable[Any], data)


def _first(batch: Any) -> torch.Tensor:
    return torch.as_tensor(batch[0] if isinstance(batch, tuple | list) else batch)


def calibrate(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    data: Any,
    method: str,
    max_batches: int,
    percentile: float = 99.99,
) -> dict[str, Any]:
    """Run data through the model, observing each chosen layer's input; {name: observer}."""
    observers = {n: OBSERVERS[method]() for n, _ in layers}
    if method == "percentile":
        for obs in observers.values():
            obs.percentile = percentile  # type: ignore[attr-defined]
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: observers[n].observe(a[0]))
        for n, m in layers
    ]
    model.eval()
    try:
        with torch.inference_mode():
            batches = list(itertools.islice(_batches(data, "static int8"), max_batches))
            for batch in tqdm(batches, desc="calibrate", leave=False):
                model(_first(batch))
    finally:
        for h in hooks:
            h.remove()
    if any(not torch.isfinite(o.lo) for o in observers.values()):
        raise InvalidArgument("static int8: the calibration data was empty; give some batches")
    return observers


def _static(model: nn.Module, cfg: StaticInt8, filter_fn: FilterFn, data: Any) -> None:
    layers = _select(model, filter_fn, "StaticInt8")
    for name, m in layers:
        _check_static_layer(name, m)
    if cfg.kernel != "gemm" and _native(model, layers, data, cfg, cfg.kernel):
        return
    obs = calibrate(model, layers, data, cfg.calibration, cfg.max_batches, cfg.percentile)
    for name, m in layers:
        scale, zp = obs[name].qparams()
        new: nn.Module
        if isinstance(m, nn.Linear):
            new = qlayers.StaticInt8Linear.from_float(m, scale, zp, cfg.per_channel)
        else:
            assert isinstance(m, nn.Conv2d)  # checked by _check_static_layer
            new = qlayers.StaticInt8Conv2d.from_float(m, scale, zp, cfg.per_channel)
        _set_module(model, name, new)


def _native(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    data: Any,
    cfg: StaticInt8 | QAT,
    kernel: str,
) -> bool:
    """Convert to qnative layers; False (model untouched) when kernel="auto" and the graph
    cannot carry quint8 tensors."""
    batches = qn.first_batches(_batches(data, "static int8"), getattr(cfg, "max_batches", 32))
    try:
        qn.convert_native(
            model,
            layers,
            batches,
            method=cfg.calibration,
            per_channel=cfg.per_channel,
            percentile=getattr(cfg, "percentile", 99.99),
        )
    except qn.NativeUnsupported:
        if kernel == "native":
            raise
        return False
    return True


def prepare_qat(
    model: nn.Module,
    data: Any,
    filter_fn: FilterFn | None = None,
    calibration: str = "minmax",
    *,
    weight_bits: int = 8,
    act_bits: int = 8,
    max_batches: int = 8,
) -> nn.Module:
    """Swap chosen Linear/Conv2d for fake-quant twins, their ranges seeded by calibration.

    weight_bits / act_bits below 8 simulate lower precision (accuracy only; see qat.py).
    Before any training the prepared model in eval mode *is* post-training quantization at
    those bits (the calibrated ranges, round-to-nearest weights).
    """
    if not (2 <= weight_bits <= 8 and 2 <= act_bits <= 8):
        raise InvalidArgument(
            f"prepare_qat: weight_bits={weight_bits}, act_bits={act_bits}: use 2 to 8 bits"
        )
    layers = _select(model, filter_fn or _linear_or_conv, "QAT")
    for name, m in layers:
        _check_static_layer(name, m)
    obs = calibrate(model, layers, data, calibration, max_batches=max_batches)
    for name, m in layers:
        lo, hi = obs[name].range()
        cls = FakeQuantLinear if isinstance(m, nn.Linear) else FakeQuantConv2d
        _set_module(model, name, cls(m, lo, hi, weight_bits, act_bits))  # type: ignore[arg-type]
    return model


def convert_qat(
    model: nn.Module,
    per_channel: bool = True,
    kernel: str = "gemm",
    data: Any = None,
    calibration: str = "minmax",
) -> nn.Module:
    """Replace every fake-quant twin by its static int8 layer.

    kernel="gemm": the layer keeps the input range its twin tracked in training. "native" or
    "auto" (needs `data`, inputs to calibrate on): the fine-tuned float layers are calibrated
    again with their output ranges and become qnative layers (auto: gemm if the graph cannot
    carry quint8 tensors).
    """
    _check_kernel("convert_qat", kernel)
    if kernel != "gemm":
        twins = [(n, m) for n, m in model.named_modules() if isinstance(m, FAKE_QUANT)]
        for name, m in twins:
            _set_module(model, name, m.float_module)
        floats = [(n, m.float_module) for n, m in twins]
        cfg = StaticInt8(calibration=calibration, per_channel=per_channel)  # type: ignore[arg-type]
        if _native(model, floats, data, cfg, kernel):
            return model
        for name, m in twins:  # auto, and the graph refused quint8: back to the twins
            _set_module(model, name, m)
    for name, m in list(model.named_modules()):
        if isinstance(m, FAKE_QUANT):
            _set_module(model, name, m.convert(per_channel))
    return model


def _qat(model: nn.Module, cfg: QAT, filter_fn: FilterFn, data: Any) -> None:
    if not (isinstance(data, tuple) and len(data) == 2 and hasattr(data[1], "shape")):
        raise InvalidArgument(
            "QAT fine-tunes on labelled data: pass data=(inputs, labels) tensors "
            "(--data with labels on the command line)"
        )
    x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    prepare_qat(model, x, filter_fn, cfg.calibration)
    if cfg.epochs:
        options = {"epochs": cfg.epochs, "lr": cfg.lr, "desc": "qat", **cfg.fit_options}
        fit(model, classification_loss, (x, y), TrainConfig(**options))
    model.eval()
    convert_qat(model, cfg.per_channel, cfg.kernel, x, cfg.calibration)


_HANDLERS: dict[type, tuple[Callable[..., None], FilterFn]] = {
    DynamicInt8: (_dynamic, _linear_only),
    WeightOnlyInt8: (_weight_int8, _linear_only),
    WeightOnlyInt4: (_weight_int4, _linear_only),
    StaticInt8: (_static, _linear_or_conv),
    QAT: (_qat, _linear_or_conv),
}


def quantize_(
    model: nn.Module, config: Any, filter_fn: FilterFn | None = None, *, data: Any = None
) -> nn.Module:
    """Quantize `model` in place with `config`; filter_fn(module, name) picks the layers.

    `data`: calibration batches for StaticInt8 and training batches for QAT (an iterable of
    input tensors or (inputs, labels) pairs). Returns the model.
    """
    try:
        handler, default_filter = _HANDLERS[type(config)]
    except KeyError:
        names = ", ".join(t.__name__ for t in _HANDLERS)
        raise InvalidArgument(
            f"quantize_: {type(config).__name__} is not a quantization config; use one of {names}"
        ) from None
    handler(model, config, filter_fn or default_filter, data)
    return model
