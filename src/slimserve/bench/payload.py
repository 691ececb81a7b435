"""The request a benchmark sends, encoded once per protocol.

Inputs come from a v2 JSON request file (`--input-file`, as sent with curl) or are synthesized
from the model's metadata: random values of the declared shape and datatype (free dimensions
become `batch_size` for the first, 1 for the others), short sentences for BYTES. The same
arrays are then encoded as v2 JSON, as the v2 binary tensor extension, and as a gRPC
ModelInferRequest, so every protocol carries exactly the same tensors.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from slimserve.errors import InvalidArgument
from slimserve.types import DATATYPE_TO_NUMPY

SENTENCES = (
    b"The quick brown fox jumps over the lazy dog.",
    b"A model server answers many small requests quickly.",
    b"Batching requests together makes better use of the CPU.",
    b"Benchmarks should report latency percentiles, not only averages.",
)


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    datatype: str
    array: np.ndarray  # numeric: its v2 dtype; BYTES: an object array of bytes


@dataclass(frozen=True, slots=True)
class Payload:
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...]  # output names to ask for; empty: all (server default)
    # Request parameters sent with every request (`--parameter KEY=VALUE`), e.g. an objective.
    parameters: tuple[tuple[str, bool | int | float | str], ...] = ()


def _synthetic(
    name: str, datatype: str, shape: tuple[int, ...], rng: np.random.Generator
) -> Tensor:
    if datatype == "BYTES":
        picks = rng.integers(0, len(SENTENCES), size=int(np.prod(shape)))
        array = np.array([SENTENCES[i] for i in picks], dtype=object).reshape(shape)
    elif datatype in ("FP16", "FP32", "FP64"):
        array = rng.standard_normal(shape).astype(DATATYPE_TO_NUMPY[datatype])
    elif datatype == "BF16":  # carried as the upper 16 bits of float32
        array = (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(
            np.uint16
        )
    elif datatype == "BOOL":
        array = rng.integers(0, 2, size=shape).astype(np.bool_)
    else:  # integers: small non-negative values are valid ids and indices for most models
        array = rng.integers(0, 100, size=shape).astype(DATATYPE_TO_NUMPY[datatype])
    return Tensor(name, datatype, array)


def _concrete_shape(shape: list[int], batch_size: int) -> tuple[int, ...]:
    dims, first = [], True
    for d in shape:
        if d == -1:
            dims.append(batch_size if first else 1)
            first = False
        else:
            dims.append(int(d))
    return tuple(dims)


def from_metadata(meta: dict[str, Any], batch_size: int = 1, seed: int = 0) -> Payload:
    """Synthesize inputs from v2 model metadata ({"inputs": [{name, datatype, shape}], ...})."""
    rng = np.random.default_rng(seed)
    specs = meta.get("inputs") or []
    if not specs:
        raise InvalidArgument(
            f"model '{meta.get('name')}' declares no inputs in its metadata; "
            "give the request with --input-file request.json"
        )
    tensors = tuple(
        _synthetic(s["name"], s["datatype"], _concrete_shape(s["shape"], batch_size), rng)
        for s in specs
    )
    outputs = tuple(o["name"] for o in meta.get("outputs") or [])
    return Payload(tensors, outputs)


def _tensor_from_json(item: dict[str, Any], path: Path) -> Tensor:
    try:
        name, datatype, shape, data = item["name"], item["datatype"], item["shape"], item["data"]
    except KeyError as exc:
        raise InvalidArgument(f"{path}: an input lacks {exc.args[0]!r}") from None
    if datatype not in DATATYPE_TO_NUMPY:
        raise InvalidArgument(f"{path}: input {name!r} has unknown datatype {datatype!r}")
    if datatype == "BYTES":
        flat = [d.encode() if isinstance(d, str) else bytes(d) for d in np.ravel(data)]
        array = np.array(flat, dtype=object)
    else:
        array = np.asarray(data, dtype=DATATYPE_TO_NUMPY[datatype])
    try:
        array = array.reshape(shape)
    except ValueError:
        raise InvalidArgument(
            f"{path}: input {name!r} has {array.size} values, which do not fit shape {shape}"
        ) from None
    return Tensor(name, datatype, array)


def from_request_file(path: Path) -> Payload:
    """Read a v2 JSON request body (the file curl would send)."""
    try:
        body = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InvalidArgument(f"--input-file {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"--input-file {path}: not valid JSON ({exc})") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise InvalidArgument(
            f"--input-file {path}: expected a v2 request body "
            '{"inputs": [{"name", "datatype", "shape", "data"}]}'
        )
    tensors = tuple(_tensor_from_json(item, path) for item in body["inputs"])
    outputs = tuple(o["name"] for o in body.get("outputs") or [] if "name" in o)
    return Payload(tensors, outputs)


def raw_bytes(t: Tensor) -> bytes:
    """The tensor flat and row-major; BYTES elements as 4-byte little-endian length + bytes."""
    if t.datatype != "BYTES":
        return np.ascontiguousarray(t.array).tobytes()
    return b"".join(struct.pack("<I", len(e)) + e for e in t.array.ravel())


def _json_data(t: Tensor) -> Any:
    if t.datatype == "BYTES":
        return [e.decode("utf-8", "replace") for e in t.array.ravel()]
    return t.array.ravel()


def json_body(p: Payload) -> bytes:
    """v2 JSON body with flat `data` lists."""
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": t.name,
                "datatype": t.datatype,
                "shape": list(t.array.shape),
                "data": _json_data(t),
            }
            for t in p.inputs
        ]
    }
    if p.outputs:
        body["outputs"] = [{"name": n} for n in p.outputs]
    if p.parameters:
        body["parameters"] = dict(p.parameters)
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def binary_body(p: Payload) -> tuple[bytes, int]:
    """v2 binary-extension body and its JSON header length; outputs are asked for in binary."""
    raws = [raw_bytes(t) for t in p.inputs]
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": t.name,
                "datatype": t.datatype,
                "shape": list(t.array.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
            for t, raw in zip(p.inputs, raws, strict=True)
        ]
    }
    if p.outputs:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in p.outputs]
    else:
        header["parameters"] = {"binary_data_output": True}
    if p.parameters:
        header["parameters"] = {**header.get("parameters", {}), **dict(p.parameters)}
    head = orjson.dumps(header)
    return head + b"".join(raws), len(head)


def grpc_request(p: Payload, model: str, version: str = "") -> bytes:
    """A serialized inference.ModelInferRequest with raw_input_contents."""
    pb = grpc_messages()
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for t in p.inputs:
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = t.name, t.datatype
        tensor.shape.extend(t.array.shape)
        request.raw_input_contents.append(raw_bytes(t))
    for name in p.outputs:
        request.outputs.add().name = name
    for key, value in p.parameters:
        param = request.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value
    return bytes(request.SerializeToString())


def grpc_messages() -> Any:
    """The module holding the v2 protobuf messages: slimserve's own stubs, else tritonclient's.

    Both define package `inference` with the same field numbers for the inference messages.
    """
    try:
        from slimserve.transport.vendor import grpc_service_pb2 as pb
    except ImportError:
        try:
            from tritonclient.grpc import service_pb2 as pb  # type: ignore[no-redef]
        except ImportError:
            raise InvalidArgument(
                "gRPC benchmarking needs the v2 protobuf stubs: build slimserve with its "
                "transport/vendor package, or `pip install tritonclient[grpc]`"
            ) from None
    return pb
