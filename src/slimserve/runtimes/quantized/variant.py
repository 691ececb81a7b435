"""`VariantModel`: rebuild a quantized or reduced-precision torch variant from class + args.

A variant that quantize_ or precision changed is saved as `model.safetensors` of a
VariantModel, and its variant.yaml carries

    model_class: slimserve.runtimes.quantized.variant:VariantModel
    model_args: {base_class: slimserve.zoo:LeNet5, base_args: {...},
                 layers: {classifier.1: {kind: int8_dynamic, in_features: 400, ...}},
                 dtype: bfloat16}

so the torch runtime loads it like any model: build the class with model_args, then
load_state_dict from safetensors. No pickle, no code in the artifact.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.runtimes.quantized.layers import GEMM_KINDS, QuantizedLayer
from slimserve.runtimes.quantized.native import NATIVE_KINDS
from slimserve.runtimes.quantized.sequential import use_native_sequentials

# Every quantized layer kind a variant.yaml may name, to rebuild it empty before loading.
LAYER_KINDS: dict[str, type[QuantizedLayer]] = {**GEMM_KINDS, **NATIVE_KINDS}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_class(path: str) -> type[nn.Module]:
    """'package.module:ClassName' -> the class, which must be a torch.nn.Module subclass (as
    runtimes/torch.py requires of model.yaml's model_class): variant.yaml cannot make the
    server call any other importable callable."""
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgument(f"model_class {path!r} cannot be imported: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InvalidArgument(f"model_class {path!r} is not a torch.nn.Module class")
    return cls


# Float layers a structural change (pruning whole neurons) resized: rebuilt at their new shape.
FLOAT_KINDS: dict[str, type[nn.Module]] = {
    "linear": nn.Linear,
    "conv2d": nn.Conv2d,
    "batchnorm1d": nn.BatchNorm1d,
    "batchnorm2d": nn.BatchNorm2d,
}


def float_layer_spec(module: nn.Module) -> dict[str, Any] | None:
    """Constructor arguments of a Linear/Conv2d/BatchNorm layer, or None for other modules."""
    if isinstance(module, nn.Linear):
        return {
            "kind": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.Conv2d):
        return {
            "kind": "conv2d",
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "dilation": list(module.dilation),
            "groups": module.groups,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        kind = "batchnorm2d" if isinstance(module, nn.BatchNorm2d) else "batchnorm1d"
        return {
            "kind": kind,
            "num_features": module.num_features,
            "eps": module.eps,
            "affine": module.affine,
        }
    return None


def _swap_in_empty_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    for name, spec in layers.items():
        args = dict(spec)
        kind = args.pop("kind")
        cls = LAYER_KINDS.get(kind) or FLOAT_KINDS.get(kind)
        if cls is None:
            raise InvalidArgument(f"layer {name!r}: unknown layer kind {kind!r}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls(**args))


class VariantModel(nn.Module):
    """The base model with quantized layers swapped in and/or its weights in another dtype.

    Floating inputs are cast to `dtype` and floating outputs back to float32, so callers see
    the same tensor types as the original model.
    """

    def __init__(
        self,
        base_class: str,
        base_args: dict[str, Any] | None = None,
        layers: dict[str, dict[str, Any]] | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise InvalidArgument(f"dtype {dtype!r} is unknown; use one of {list(DTYPES)}")
        self.dtype = DTYPES[dtype]
        model = import_class(base_class)(**(base_args or {}))
        _swap_in_empty_layers(model, layers or {})
        use_native_sequentials(model)  # as quantize_ left them (native int8 layers only)
        model = model.to(self.dtype)  # floating tensors only: int8 buffers keep their type
        self.model = model.eval()

    def _cast(self, x: Any, dtype: torch.dtype) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(dtype)
        return x

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(self._cast(a, self.dtype) for a in args)
        kwargs = {k: self._cast(v, self.dtype) for k, v in kwargs.items()}
        out = self.model(*args, **kwargs)
        if isinstance(out, tuple | list):
            return type(out)(self._cast(o, torch.float32) for o in out)
        return self._cast(out, torch.float32)
