"""KServe v2 messages over gRPC: protobuf messages to `slimserve.types` and back.

Pure functions, no I/O, so they are tested alone. Tensor data arrives either as one buffer per
input in `raw_input_contents` (what tritonclient sends) or in the typed repeated field of
`InferTensorContents` that matches the datatype; FP16 and BF16 have no typed field and come
only raw. Raw buffers are flat, row-major, unpadded and little-endian, and become
`np.frombuffer` views (read-only, no copy) once their size is checked against shape x
itemsize. A BYTES element, raw, is a 4-byte little-endian length followed by its bytes; that
format is walked element by element, as it must be. Responses always carry
`raw_output_contents`, one buffer per output in the order of `outputs`.

Parameters map to Python values (bool, int, str, float). One is translated: `timeout`, which
Triton's clients send as an int64 in microseconds (tritonclient's `infer(timeout=...)`), while
the engine reads float seconds; a double or string `timeout` is taken as seconds already. The
controls among them (timeout, priority, degrade, variant) become the request's typed
`controls` (transport/controls.py), the call's gRPC deadline bounding its timeout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import orjson

from slimserve import types
from slimserve.errors import InvalidArgument, Unimplemented
from slimserve.transport import v2_shapes as shapes
from slimserve.transport.controls import take_controls, with_deadline
from slimserve.transport.limits import check_extent, check_int_range
from slimserve.transport.raw import pack_bytes, tensor_from_raw
from slimserve.transport.vendor import grpc_service_pb2 as pb
from slimserve.transport.vendor import model_config_pb2 as mc

MAX_DIMS = 32  # numpy allows 64; no model here has more than a handful
_RAW_WHERE = "its raw_input_contents buffer"
_INT64_MIN, _UINT64_END = -(1 << 63), 1 << 64
# Little-endian dtypes for raw buffers (the wire order, whatever the host's).
# InferTensorContents field -> (numpy dtype of its values, the datatypes it carries), as
# grpc_service.proto declares them; CONTENTS_FIELDS looks them up by datatype.
_FIELDS: dict[str, tuple[type[np.generic], tuple[str, ...]]] = {
    "bool_contents": (np.bool_, ("BOOL",)),
    "int_contents": (np.int32, ("INT8", "INT16", "INT32")),
    "int64_contents": (np.int64, ("INT64",)),
    "uint_contents": (np.uint32, ("UINT8", "UINT16", "UINT32")),
    "uint64_contents": (np.uint64, ("UINT64",)),
    "fp32_contents": (np.float32, ("FP32",)),
    "fp64_contents": (np.float64, ("FP64",)),
    "bytes_contents": (np.object_, ("BYTES",)),
}
CONTENTS_FIELDS: dict[str, tuple[str, np.dtype[Any]]] = {
    datatype: (field, np.dtype(values))
    for field, (values, datatypes) in _FIELDS.items()
    for datatype in datatypes
}
_ALL_FIELDS = sorted(_FIELDS)


# -- requests ------------------------------------------------------------------------------


def decode_infer_request(
    message: pb.ModelInferRequest,
    client: str | None = None,
    time_remaining: float | None = None,
) -> types.InferRequest:
    """A ModelInferRequest as an InferRequest (arrays are views of the message's buffers).

    `time_remaining`: the call's deadline (seconds left), which bounds the request's timeout.
    """
    params = decode_parameters(message.parameters, "the request")
    variant, controls = take_controls(params)
    return types.InferRequest(
        model=message.model_name,
        inputs=decode_inputs(message),
        version=message.model_version or None,
        variant=variant,
        outputs=requested_outputs(message.outputs),
        id=message.id or None,
        parameters=params,
        client=client,
        controls=with_deadline(controls, time_remaining),
    )


def decode_inputs(message: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    tensors, raw = message.inputs, message.raw_input_contents
    if not tensors:
        raise InvalidArgument("the request has no inputs; add one InferInputTensor per input")
    if raw and len(raw) != len(tensors):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} buffers for {len(tensors)} inputs; send one "
            "buffer per input, in the order of 'inputs'"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(tensors):
        name, datatype, shape = tensor_header(tensor)
        if name in arrays:
            raise InvalidArgument(f"input {name!r} is given twice")
        if not raw:
            arrays[name] = contents_tensor(tensor.contents, datatype, shape, name)
            continue
        if tensor.HasField("contents"):
            raise InvalidArgument(
                f"input {name!r} has 'contents' but the request uses raw_input_contents; "
                "send every input one way"
            )
        arrays[name] = tensor_from_raw(raw[i], datatype, shape, name, _RAW_WHERE)
    return arrays


def tensor_header(tensor: Any) -> tuple[str, str, tuple[int, ...]]:
    """Name, datatype and shape of an input tensor, each checked."""
    name = tensor.name
    if not name:
        raise InvalidArgument("each input needs a name")
    if len(name) > 256:
        raise InvalidArgument(f"input name {name[:32]!r}... is {len(name)} characters; max 256")
    datatype = tensor.datatype
    if datatype not in types.DATATYPE_TO_NUMPY:
        raise InvalidArgument(
            f"input {name!r}: datatype {datatype[:32]!r} is not one of "
            f"{', '.join(types.DATATYPE_TO_NUMPY)}"
        )
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise InvalidArgument(
            f"input {name!r}: shape {list(shape)[: MAX_DIMS + 1]} must have at most {MAX_DIMS} "
            "non-negative dimensions"
        )
    check_extent(shape, name)
    return name, datatype, shape


def contents_tensor(
    contents: pb.InferTensorContents, datatype: str, shape: tuple[int, ...], name: str
) -> np.ndarray:
    """Typed `contents` as an array of `shape` in the datatype's numpy dtype."""
    if datatype not in CONTENTS_FIELDS:
        raise InvalidArgument(
            f"input {name!r} is {datatype}, which has no typed contents field: send its data "
            "in raw_input_contents (2 bytes per element, little-endian)"
        )
    field, wire_dtype = CONTENTS_FIELDS[datatype]
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(_count_message(contents, datatype, shape, name, len(values)))
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    array = np.fromiter(values, dtype=wire_dtype, count=count)
    target = types.DATATYPE_TO_NUMPY[datatype]
    if target != wire_dtype:  # INT8/16 in int32, UINT8/16 in uint32: check they fit
        check_int_range(array, target, name)
        array = array.astype(target)
    return array.reshape(shape)


def _count_message(
    contents: pb.InferTensorContents, datatype: str, shape: tuple[int, ...], name: str, got: int
) -> str:
    field = CONTENTS_FIELDS[datatype][0]
    if got == 0:
        others = [f for f in _ALL_FIELDS if f != field and len(getattr(contents, f))]
        if others:
            return (
                f"input {name!r} is {datatype}, whose data goes in contents.{field}, but the "
                f"request filled contents.{others[0]}"
            )
    return (
        f"input {name!r}: shape {list(shape)} holds {math.prod(shape)} elements but "
        f"contents.{field} has {got}; make them agree (or use raw_input_contents)"
    )


def requested_outputs(items: Iterable[Any]) -> tuple[str, ...] | None:
    """Names of the requested outputs (None: all). Raw output is the only form we send."""
    names: list[str] = []
    for item in items:
        if not item.name:
            raise InvalidArgument("each requested output needs a name")
        if item.name in names:
            raise InvalidArgument(f"output {item.name!r} is requested twice")
        params = decode_parameters(item.parameters, f"output {item.name!r}")
        if params.get("classification"):
            raise Unimplemented(
                "the classification extension is not supported; ask for raw outputs"
            )
        names.append(item.name)
    return tuple(names) or None


# -- parameters ----------------------------------------------------------------------------


def decode_parameters(params: Mapping[str, pb.InferParameter], where: str) -> dict[str, Any]:
    """A parameters map as {key: bool | int | str | float}; `timeout` becomes seconds."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        if which is None:
            raise InvalidArgument(f"parameter {key!r} of {where} has no value")
        out[key] = getattr(param, which)
    if "timeout" in out:
        out["timeout"] = timeout_seconds(params["timeout"])
    return out


def timeout_seconds(param: pb.InferParameter) -> float:
    """The `timeout` parameter in seconds: int64/uint64 are Triton's microseconds."""
    which = param.WhichOneof("parameter_choice")
    if which in ("int64_param", "uint64_param"):
        return float(getattr(param, which)) / 1e6
    if which == "double_param":
        return param.double_param
    if which == "string_param":
        try:
            return float(param.string_param)
        except ValueError:
            pass
    raise InvalidArgument(
        "parameter 'timeout' must be a number: int64 microseconds (as tritonclient sends it) "
        "or a double in seconds"
    )


def encode_parameters(values: Mapping[str, Any], target: Any) -> None:
    """Write {key: value} into a protobuf map of InferParameter."""
    for key, value in values.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int | np.integer) and _INT64_MIN <= value < _UINT64_END:
            if value < 1 << 63:
                param.int64_param = int(value)
            else:
                param.uint64_param = int(value)
        elif isinstance(value, float | np.floating):
            param.double_param = float(value)
        elif isinstance(value, str):
            param.string_param = value
        else:  # lists, dicts, huge ints: as JSON text
            param.string_param = orjson.dumps(value, default=str).decode()


# -- responses -----------------------------------------------------------------------------


def encode_infer_response(response: types.InferResponse) -> pb.ModelInferResponse:
    """An InferResponse as a ModelInferResponse with one raw buffer per output."""
    message = pb.ModelInferResponse(
        model_name=response.served_name, model_version=response.version, id=response.id or ""
    )
    encode_parameters(response.parameters, message.parameters)
    buffers = []
    for name, array in response.outputs.items():
        datatype = types.datatype_of(array)
        message.outputs.add(name=name, datatype=datatype, shape=array.shape)
        buffers.append(raw_bytes(array, datatype))
    message.raw_output_contents.extend(buffers)
    return message


def raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    """The raw wire form of an array: row-major little-endian bytes, BYTES length-prefixed."""
    if datatype == "BYTES":
        return pack_bytes(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()  # C order, whatever the array's strides


# -- metadata, configuration, statistics, repository --------------------------------------


def server_metadata_message(meta: types.ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(
        name=meta.name, version=meta.version, extensions=list(meta.extensions)
    )


def _tensor_metadata(spec: types.TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


def model_metadata_message(meta: types.ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=list(meta.versions),
        platform=meta.platform,
        inputs=[_tensor_metadata(s) for s in meta.inputs],
        outputs=[_tensor_metadata(s) for s in meta.outputs],
    )


def model_config_message(config: types.ModelSettings) -> pb.ModelConfigResponse:
    def kind(spec: types.TensorSpec) -> Any:
        return mc.DataType.Value(shapes.triton_type(spec.datatype))

    message = mc.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        max_batch_size=config.max_batch_size,
        input=[
            mc.ModelInput(
                name=s.name, data_type=kind(s), dims=shapes.config_dims(s, config.batched)
            )
            for s in config.inputs
        ],
        output=[
            mc.ModelOutput(
                name=s.name, data_type=kind(s), dims=shapes.config_dims(s, config.batched)
            )
            for s in config.outputs
        ],
    )
    if config.batched:
        message.dynamic_batching.max_queue_delay_microseconds = config.max_queue_delay_us
    return pb.ModelConfigResponse(config=message)


def _duration(d: types.Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _unit_statistics(s: types.ModelStatistics) -> pb.ModelStatistics:
    no_copy = pb.StatisticDuration(count=s.compute.count, ns=0)
    message = pb.ModelStatistics(
        name=s.name,
        version=s.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=no_copy,
            compute_infer=_duration(s.compute),
            compute_output=no_copy,
            cache_hit=pb.StatisticDuration(),
            cache_miss=pb.StatisticDuration(),
        ),
    )
    for b in s.batches:
        zero = pb.StatisticDuration(count=b.executions.count, ns=0)
        message.batch_stats.add(
            batch_size=b.batch_size,
            compute_input=zero,
            compute_infer=_duration(b.executions),
            compute_output=zero,
        )
    return message


def statistics_message(stats: Iterable[types.ModelStatistics]) -> pb.ModelStatisticsResponse:
    return pb.ModelStatisticsResponse(model_stats=[_unit_statistics(s) for s in stats])


def index_message(rows: Iterable[types.RepositoryEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=r.name, version=r.version, state=r.state, reason=r.reason
            )
            for r in rows
        ]
    )


def load_parameters(params: Mapping[str, pb.ModelRepositoryParameter]) -> None:
    """Refuse load-time overrides (a config or files sent with the request): not supported."""
    overrides = [k for k in params if k == "config" or k.startswith("file:")]
    if overrides:
        raise Unimplemented(
            f"load parameter {overrides[0]!r} (a config or file override) is not supported; "
            "edit model.yaml in the repository and load again"
        )
