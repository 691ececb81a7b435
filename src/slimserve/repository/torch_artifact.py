"""Import safetensors weights with their nn.Module class (`package.module:Class`).

The class is built with `model_args` and the weights are loaded strictly, which proves they
belong together; the input shape comes from `--input-shape` or the first Linear layer, and one
forward pass on zeros (batch 2) gives the output names, datatypes and shapes. Imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimserve.errors import InvalidArgument
from slimserve.repository.artifact_base import (
    SAFETENSORS_FILE,
    Imported,
    batching_for,
    copy_file,
    make_config,
)
from slimserve.repository.schema import TensorConfig
from slimserve.types import datatype_of


def inspect_safetensors(
    path: Path,
    model_class: str,
    model_args: dict[str, Any],
    input_shape: Sequence[int] | None,
    max_batch_size: int | None,
) -> Imported:
    module = _build_module(path, model_class, model_args)
    shape = list(input_shape) if input_shape is not None else _first_layer_shape(path, module)
    if any(d <= 0 for d in shape):
        raise InvalidArgument(f"--input-shape {shape}: give positive sizes, e.g. 1,28,28")
    outputs = _probe_outputs(path, module, shape)
    config = make_config(
        backend="torch",
        model_class=model_class,
        model_args=model_args,
        inputs=[TensorConfig(name="input", datatype="FP32", shape=[-1, *shape])],
        outputs=outputs,
        batching=batching_for(max_batch_size),
    )
    return Imported(config, lambda dest: copy_file(path, dest / SAFETENSORS_FILE))


def _build_module(path: Path, model_class: str, model_args: dict[str, Any]) -> Any:
    """Instantiate the class and load the weights strictly (proves they belong together)."""
    from safetensors.torch import load_file

    cls = _import_class(model_class)
    try:
        module = cls(**model_args)
    except Exception as exc:  # noqa: BLE001 - the user's constructor: any failure is an argument problem
        raise InvalidArgument(
            f"{model_class}(**{model_args}) failed: {exc}; fix: check --model-args"
        ) from None
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise InvalidArgument(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).replace("\n", " ")[:600]
        raise InvalidArgument(
            f"{path}: the weights do not fit {model_class}(**{model_args}): {detail}; fix: "
            "pass the --model-args the weights were trained with, or the right class"
        ) from None
    return module.eval()


def _import_class(model_class: str) -> Any:
    import importlib

    from torch import nn

    module_name, _, class_name = model_class.partition(":")
    if not module_name or not class_name:
        raise InvalidArgument(f"--model-class {model_class!r}: use 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgument(
            f"--model-class {model_class!r}: cannot import it ({exc}); fix: install the "
            "package that defines it, or correct the name"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InvalidArgument(f"--model-class {model_class!r} is not a torch.nn.Module class")
    return cls


def _first_layer_shape(path: Path, module: Any) -> list[int]:
    """The per-example input shape, read from the first layer when it tells (Linear)."""
    from torch import nn

    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            return [int(layer.in_features)]
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise InvalidArgument(
                f"{path}: the first layer is {type(layer).__name__} with {layer.in_channels} "
                "input channels, but its spatial size cannot be read from the weights; fix: "
                f"pass --input-shape, e.g. {layer.in_channels},28,28 (without the batch size)"
            )
        if isinstance(layer, nn.Embedding):
            break
    raise InvalidArgument(
        f"{path}: cannot tell the input shape from the model's first layer; fix: pass "
        "--input-shape (one example's shape without the batch size, e.g. 784 or 3,32,32)"
    )


def _probe_outputs(path: Path, module: Any, shape: list[int]) -> list[TensorConfig]:
    """Run a batch of 2 zeros: output names, datatypes, and shapes after the batch dim."""
    import torch

    try:
        with torch.inference_mode():
            result = module(torch.zeros((2, *shape), dtype=torch.float32))
    except Exception as exc:  # noqa: BLE001 - the user's forward: report it as a shape/argument problem
        raise InvalidArgument(
            f"{path}: the model failed on zeros of shape (batch, {', '.join(map(str, shape))}): "
            f"{exc}; fix: pass the right --input-shape"
        ) from None
    named = _named_outputs(result)
    specs = []
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or tensor.shape[0] != 2:
            raise InvalidArgument(
                f"{path}: output '{name}' does not keep the batch dimension; slimserve's "
                "torch backend needs forward() to return (batch, ...) tensors"
            )
        specs.append(
            TensorConfig(
                name=name,
                datatype=_torch_datatype(tensor),
                shape=[-1, *(int(d) for d in tensor.shape[1:])],
            )
        )
    return specs


def _named_outputs(result: Any) -> dict[str, Any]:
    """forward()'s result as {name: tensor}: 'output', 'output_0..', or a dict's keys."""
    if isinstance(result, dict):
        return {str(k): v for k, v in result.items()}
    if isinstance(result, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(result)}
    return {"output": result}


def _torch_datatype(tensor: Any) -> str:
    import torch

    if tensor.dtype == torch.bfloat16:
        return "BF16"
    return datatype_of(np.empty(0, dtype=tensor.detach().numpy().dtype))
