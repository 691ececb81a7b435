"""Tensors, requests and responses shared by every layer.

This module imports nothing else from slimserve: it is the vocabulary the transports, the
engine and the runtimes speak. Tensors are numpy arrays; BYTES tensors are object arrays of
`bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# KServe v2 datatype name -> numpy dtype. BF16 has no numpy dtype: it travels as its raw
# 16-bit pattern in a uint16 array, and runtimes that take bf16 view it as such.
DATATYPE_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
DATATYPES: tuple[str, ...] = tuple(DATATYPE_TO_NUMPY)

_NUMPY_TO_DATATYPE: dict[np.dtype[Any], str] = {
    dt: name for name, dt in DATATYPE_TO_NUMPY.items() if name != "BF16"
}


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype that carries a v2 datatype; KeyError for an unknown name."""
    return DATATYPE_TO_NUMPY[datatype]


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name of a numpy array (str/bytes/object arrays are BYTES)."""
    dt = array.dtype
    if dt.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _NUMPY_TO_DATATYPE[dt]
    except KeyError:
        raise TypeError(f"numpy dtype {dt} has no KServe v2 datatype") from None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared input or output: name, v2 datatype and shape (-1 marks a free dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(slots=True)
class InferRequest:
    """One inference request, transport-neutral.

    `inputs` hold arrays whose first dimension is the batch dimension when the model batches.
    `variant` names a variant of the version (None: the original). `outputs` restricts which
    outputs come back (None: all).
    """

    model: str
    inputs: dict[str, np.ndarray]
    version: str | None = None
    variant: str | None = None
    outputs: tuple[str, ...] | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    # Who is asking (API key identity or peer address), for rate limits and audit.
    client: str | None = None
    # Per-request latency objective, parsed once by the codecs (policies/slo.py): answer
    # within this many ms, giving up at most `max_quality_loss` points against the original
    # (None: the model's degrade.max_quality_loss). None: no objective.
    latency_slo_ms: float | None = None
    max_quality_loss: float | None = None


@dataclass(slots=True)
class InferResponse:
    """The answer to one InferRequest: which model, version and variant answered, and what."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]
    variant: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def served_name(self) -> str:
        """The name a client addresses: `model` or `model:variant`."""
        return self.model if self.variant is None else f"{self.model}:{self.variant}"
