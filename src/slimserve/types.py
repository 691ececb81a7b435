"""Tensors, requests and responses shared by every layer.

This module imports nothing else from slimserve: it is the vocabulary the transports, the
engine and the runtimes speak. Tensors are numpy arrays; BYTES tensors are object arrays of
`bytes`.
"""

from __future__ import annotations

from collections.abc import Callable
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

# Monotonic seconds. One clock is built in slimserve.app and passed to every part that decides
# by time (deadlines, batching windows, admission, residency, generation deadlines); tests pass
# slimserve.testing.FakeClock. Metrics that only measure use time.perf_counter.
Clock = Callable[[], float]

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


@dataclass(frozen=True, slots=True)
class RequestControls:
    """How a request asks to be handled (not what it computes), parsed once by the codecs
    from the request's parameters (transport/controls.py); nothing downstream reads those
    parameters again. A new control is a field here and a line in transport/controls.py."""

    timeout_s: float | None = None  # seconds from arrival; also a gRPC call's deadline
    priority: int = 0  # higher is served first from a model's queue
    degrade: bool | None = None  # may a cheaper variant answer? None: model.yaml's degrade.allow
    # Per-request objective (policies/slo.py): answer within this many ms from arrival, giving
    # up at most `max_quality_loss` points against the original (None: the model's
    # degrade.max_quality_loss). latency_slo_ms None: no objective, nothing changes.
    latency_slo_ms: float | None = None
    max_quality_loss: float | None = None


NO_CONTROLS = RequestControls()


@dataclass(slots=True)
class InferRequest:
    """One inference request, transport-neutral.

    `inputs` hold arrays whose first dimension is the batch dimension when the model batches.
    `variant` names a variant of the version (None: the original, or the one `model` names
    as 'name:variant'). `outputs` restricts which outputs come back (None: all).
    `parameters` are the model's own (e.g. a language model's sampling parameters).
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
    controls: RequestControls = NO_CONTROLS


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


# -- what the engine answers besides inference (each codec owns its wire shape) ----------------


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """A served name's description. `state` is READY, LOADING, UNLOADED, UNAVAILABLE...;
    `reason` says why it is not ready ("" when it is); `variants` of an original version."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    state: str
    reason: str = ""
    variants: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """How a model is served (the v2 "model config"): tensors with their full shapes (-1 for
    the batch dimension when `batched`), batching limits."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batched: bool
    max_queue_delay_us: int  # the batching window, microseconds


@dataclass(frozen=True, slots=True)
class Duration:
    """`count` events that took `ns` nanoseconds in all."""

    count: int
    ns: int


@dataclass(frozen=True, slots=True)
class BatchStatistics:
    batch_size: int  # rows
    executions: Duration


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    """Counters of one served unit since it was first loaded (Triton's statistics)."""

    name: str  # served name: model or model:variant
    version: str
    last_inference_ms: int  # wall-clock milliseconds since the epoch; 0: never
    inference_count: int  # rows
    execution_count: int  # batches
    success: Duration  # requests, queue + compute
    fail: Duration
    queue: Duration
    compute: Duration  # per batch
    batches: tuple[BatchStatistics, ...] = ()


@dataclass(frozen=True, slots=True)
class RepositoryEntry:
    """One row of the repository index: a served unit, or a model with no unit to show."""

    name: str
    version: str
    state: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Health beyond live/ready: what is degraded and why."""

    status: str  # ok | degraded | starting | stopping
    live: bool
    ready: bool
    breakers_open: tuple[str, ...]
    failed_units: tuple[str, ...]
    degraded_models: tuple[str, ...]
    resident_bytes: int
    memory_budget_bytes: int
