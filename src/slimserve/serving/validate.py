"""Check a request's tensors against model.yaml before it reaches a queue."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slimserve.errors import InvalidArgument
from slimserve.repository.schema import ModelConfig
from slimserve.types import TensorSpec, datatype_of


def check_inputs(model: str, config: ModelConfig, inputs: dict[str, np.ndarray]) -> int:
    """Validate names, datatypes and shapes; return the number of rows (1 if unbatched)."""
    specs = config.input_specs()
    declared = {s.name for s in specs}
    unknown = sorted(set(inputs) - declared)
    if unknown:
        raise InvalidArgument(
            f"model '{model}' has no input {unknown[0]!r}; its inputs are {sorted(declared)}"
        )
    missing = sorted(declared - set(inputs))
    if missing:
        raise InvalidArgument(
            f"model '{model}' needs input {missing[0]!r}; send all of {sorted(declared)}"
        )
    rows = -1
    for spec in specs:
        value = inputs[spec.name]
        _check_datatype(model, spec, value)
        _check_shape(model, spec, value.shape)
        if config.batched:
            if rows not in (-1, value.shape[0]):
                raise InvalidArgument(
                    f"model '{model}': inputs disagree on the batch size "
                    f"({rows} vs {value.shape[0]} rows in {spec.name!r})"
                )
            rows = value.shape[0]
    if config.batched and rows == 0:
        raise InvalidArgument(f"model '{model}': the request has 0 rows; send at least one")
    return max(rows, 1)


def _check_datatype(model: str, spec: TensorSpec, value: np.ndarray) -> None:
    got = "BF16" if spec.datatype == "BF16" and value.dtype == np.uint16 else datatype_of(value)
    if got != spec.datatype:
        raise InvalidArgument(
            f"model '{model}' input {spec.name!r} expects datatype {spec.datatype}, got {got}"
        )


def _check_shape(model: str, spec: TensorSpec, shape: Sequence[int]) -> None:
    ok = len(shape) == len(spec.shape) and all(
        d == -1 or d == s for d, s in zip(spec.shape, shape, strict=True)
    )
    if not ok:
        raise InvalidArgument(
            f"model '{model}' input {spec.name!r} expects shape {list(spec.shape)} "
            f"(-1: any size), got {list(shape)}"
        )


def check_outputs(model: str, config: ModelConfig, wanted: Sequence[str] | None) -> None:
    if not wanted:
        return
    declared = {s.name for s in config.output_specs()}
    for name in wanted:
        if name not in declared:
            raise InvalidArgument(
                f"model '{model}' has no output {name!r}; its outputs are {sorted(declared)}"
            )
