"""Inputs made from model.yaml alone, for recipes run without --data.

They time the model and compare each variant's outputs with the original's on the same rows
(fidelity); they say nothing of accuracy, which the profile marks as not measured.

- floating inputs: uniform in [0, 1) (the range of normalised pixels and most features);
- integer inputs: token ids in [0, TOKEN_IDS) for text models (any embedding table has at
  least that many rows), except ones named like an attention mask (all 1) or token types (0);
- a -1 dimension after the batch (a sequence length) becomes SEQUENCE_LENGTH.
"""

from __future__ import annotations

import numpy as np

from slimserve.errors import InvalidArgument
from slimserve.repository.schema import ModelConfig, TensorConfig

ROWS = 256
SEQUENCE_LENGTH = 16
TOKEN_IDS = 100
_NUMPY = {
    "FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "BF16": np.float32,
    "INT64": np.int64, "INT32": np.int32, "INT16": np.int16, "INT8": np.int8,
    "UINT8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _tensor(spec: TensorConfig, rows: int, rng: np.random.Generator) -> np.ndarray:
    shape = [rows] + [SEQUENCE_LENGTH if d == -1 else d for d in spec.shape[1:]]
    dtype = _NUMPY.get(spec.datatype)
    if dtype is None:
        raise InvalidArgument(
            f"input '{spec.name}' is {spec.datatype}: no inputs can be made for it; give --data"
        )
    if np.issubdtype(dtype, np.floating):
        return rng.random(shape, dtype=np.float32).astype(dtype)
    name = spec.name.lower()
    if "mask" in name or dtype == np.bool_:
        return np.ones(shape, dtype=dtype)
    if "type" in name:
        return np.zeros(shape, dtype=dtype)
    return rng.integers(0, TOKEN_IDS, shape).astype(dtype)


def synthetic_inputs(
    config: ModelConfig, rows: int = ROWS, seed: int = 0
) -> np.ndarray | dict[str, np.ndarray]:
    """`rows` inputs shaped as model.yaml declares: an array, or a dict for several inputs."""
    if not config.inputs:
        raise InvalidArgument(
            "model.yaml declares no inputs, so none can be made; give --data, or declare "
            "inputs: [{name, datatype, shape}] in model.yaml"
        )
    rng = np.random.default_rng(seed)
    made = {spec.name: _tensor(spec, rows, rng) for spec in config.inputs}
    return next(iter(made.values())) if len(made) == 1 else made
