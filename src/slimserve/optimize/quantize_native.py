"""Convert float Linear/Conv2d layers to the quint8-flowing layers of qnative (static int8).

Steps: find each chosen layer's following ReLU (the next module of the same nn.Sequential) to
fuse; calibrate every chosen layer's input and output range (the output after the fused ReLU);
swap the layers in; run one calibration batch through the converted model to find the layer
whose output is the model's output (it dequantizes) and to prove that every op between the
layers takes quint8 tensors (max pooling, flatten, view do; residual adds, softmax and float
layers left out by the filter do not). A model that fails that run is put back exactly as it
was and NativeUnsupported names the reason (StaticInt8(kernel="auto") then uses the gemm
layers, which work on any graph). Last, the nn.Sequential holding the new layers become
qsequential.NativeSequential (same modules and state, less per-call overhead).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize.calibrate import OBSERVERS
from slimserve.runtimes.quantized import layers as qlayers
from slimserve.runtimes.quantized import native as qnative
from slimserve.runtimes.quantized import sequential as qsequential


class NativeUnsupported(InvalidArgument):
    """The model's graph cannot carry quint8 tensors between its quantized layers."""


def _parent(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent_name, _, child = fqn.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def fusable_relus(model: nn.Module, names: list[str]) -> dict[str, str]:
    """{layer name: name of the nn.ReLU right after it in the same nn.Sequential}."""
    fused: dict[str, str] = {}
    for name in names:
        parent, child = _parent(model, name)
        if not isinstance(parent, nn.Sequential):
            continue
        keys = list(parent._modules)
        i = keys.index(child)
        if i + 1 < len(keys) and type(parent._modules[keys[i + 1]]) is nn.ReLU:
            prefix = name.rpartition(".")[0]
            fused[name] = f"{prefix}.{keys[i + 1]}" if prefix else keys[i + 1]
    return fused


def _observe(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    fused: dict[str, str],
    batches: list[torch.Tensor],
    method: str,
    percentile: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input and output observers per layer over the calibration batches."""
    ins = {n: OBSERVERS[method]() for n, _ in layers}
    outs = {n: OBSERVERS[method]() for n, _ in layers}
    for obs in (*ins.values(), *outs.values()):
        if method == "percentile":
            obs.percentile = percentile  # type: ignore[attr-defined]
    hooks = []
    for n, m in layers:
        hooks.append(m.register_forward_pre_hook(lambda _m, a, n=n: ins[n].observe(a[0])))
        relu = n in fused
        hooks.append(
            m.register_forward_hook(
                lambda _m, _a, out, n=n, relu=relu: outs[n].observe(
                    out.clamp_min(0) if relu else out
                )
            )
        )
    model.eval()
    try:
        with torch.inference_mode():
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return ins, outs


def _native_layer(m: nn.Module, relu: bool) -> qnative._NativeInt8:
    if isinstance(m, nn.Linear):
        return qnative.NativeInt8Linear(m.in_features, m.out_features, m.bias is not None, relu)
    assert isinstance(m, nn.Conv2d)
    return qnative.NativeInt8Conv2d(
        groups=m.groups, bias=m.bias is not None, relu=relu, **qlayers.conv_args(m)
    )


def convert_native(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    batches: list[torch.Tensor],
    *,
    method: str = "minmax",
    per_channel: bool = True,
    percentile: float = 99.99,
) -> nn.Module:
    """Swap `layers` (name, float Linear/Conv2d) for qnative layers calibrated on `batches`."""
    if not qnative.native_available():
        raise NativeUnsupported("this torch build has no quantized CPU engine (onednn/x86)")
    fused = fusable_relus(model, [n for n, _ in layers])
    ins, outs = _observe(model, layers, fused, batches, method, percentile)
    reduce = not qnative.has_vnni()
    originals: list[tuple[str, nn.Module]] = []
    for name, m in layers:
        new = _native_layer(m, relu=name in fused)
        (in_lo, in_hi), (out_lo, out_hi) = ins[name].range(), outs[name].range()
        in_q = qnative.activation_qparams(in_lo, in_hi, reduce_range=reduce)
        out_q = qnative.activation_qparams(out_lo, out_hi, reduce_range=reduce)
        new.load_float(m.weight, m.bias, per_channel, in_q, out_q)  # type: ignore[arg-type]
        originals.append((name, _swap(model, name, new)))
    for relu_name in fused.values():
        originals.append((relu_name, _swap(model, relu_name, qnative.FusedAway())))
    try:
        _mark_float_output(model, batches[0])
    except NativeUnsupported:
        for name, old in reversed(originals):
            _swap(model, name, old)
        raise
    for m in model.modules():  # packed again at the first real call (see NativeInt8Conv2d)
        if isinstance(m, qnative._NativeInt8):
            m._packed = None
    qsequential.use_native_sequentials(model)  # the server does the same when loading
    return model


def _swap(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    parent, child = _parent(model, fqn)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old  # type: ignore[no-any-return]


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _mark_float_output(model: nn.Module, x: torch.Tensor) -> None:
    """Let the layers whose quint8 output is (part of) the model's output dequantize it."""
    natives = [m for m in model.modules() if isinstance(m, qnative._NativeInt8)]
    # quint8 must flow at any batch size here: a small batch would take the Linear's bf16 path
    linears = [m for m in natives if isinstance(m, qnative.NativeInt8Linear)]
    for m in linears:
        m.small_batch_rows = 0
    try:
        _mark_from_run(model, natives, x)
    finally:
        for m in linears:  # back to the class default; packed again with it at the next call
            del m.small_batch_rows
            m._packed = None


def _mark_from_run(model: nn.Module, natives: list[qnative._NativeInt8], x: torch.Tensor) -> None:
    # (output tensor, layer) pairs; holding the tensors keeps their identities unambiguous.
    produced: list[tuple[torch.Tensor, qnative._NativeInt8]] = []
    hooks = [m.register_forward_hook(lambda m, _a, out: produced.append((out, m))) for m in natives]
    try:
        out = _run(model, x)
    finally:
        for h in hooks:
            h.remove()
    for t in _tensors(out):
        if t.is_quantized:
            layer = next((m for o, m in produced if o is t), None)
            if layer is None:
                raise NativeUnsupported(
                    "the model's output is a quint8 tensor that no quantized layer produced "
                    "(an op after the last layer); use kernel=gemm"
                )
            layer.float_output = True
    if any(t.is_quantized for t in _tensors(_run(model, x))):  # pragma: no cover - guard
        raise NativeUnsupported("the converted model still returns quint8 tensors")


def _run(model: nn.Module, x: torch.Tensor) -> Any:
    try:
        with torch.inference_mode():
            return model(x)
    except (RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NativeUnsupported(
            f"an op between the quantized layers does not take quint8 tensors ({first[:200]}); "
            "use kernel=gemm (int8 layers that take and give float)"
        ) from exc


def first_batches(batches: Any, max_batches: int) -> list[torch.Tensor]:
    """The first `max_batches` input tensors of an iterable of batches or (inputs, labels)."""
    out = []
    for batch in itertools.islice(batches, max_batches):
        out.append(torch.as_tensor(batch[0] if isinstance(batch, tuple | list) else batch))
    if not out:
        raise InvalidArgument("static int8: the calibration data was empty; give some batches")
    return out
