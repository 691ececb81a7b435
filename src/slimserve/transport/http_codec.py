"""KServe v2 inference bodies over HTTP: JSON tensors and the binary tensor extension.

Pure functions from bytes to `InferRequest` and from `InferResponse` to bytes, with no I/O,
so they are tested alone. Conversions are vectorized: JSON `data` (flat or nested lists)
becomes an array in one `np.asarray` call, binary tensors are `np.frombuffer` views of the
request body (read-only, no copy), and numeric outputs are written by orjson straight from
the array. Only BYTES tensors loop per element, as their wire format requires.

Binary layout (Triton's binary tensor extension): the body is N bytes of JSON (N from the
`Inference-Header-Content-Length` header), then each tensor that has
`parameters.binary_data_size` in the order listed, raw, row-major, unpadded, little-endian;
a BYTES element is a 4-byte little-endian length followed by its bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
from array import array as double_array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from slimserve.errors import InvalidArgument, Unimplemented
from slimserve.transport.controls import take_controls
from slimserve.transport.limits import check_extent, check_int_range
from slimserve.transport.raw import pack_bytes, tensor_from_raw
from slimserve.types import DATATYPE_TO_NUMPY, InferRequest, InferResponse, datatype_of

MAX_DIMS = 32  # numpy allows 64; no model here has more than a handful
_BINARY_WHERE = "its binary data (binary_data_size)"
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
# Which numpy kinds (as np.asarray infers them from JSON) each datatype accepts.
_FLOAT_KINDS, _INT_KINDS = frozenset("fiu"), frozenset("iu")
_KINDS = {name: _INT_KINDS for name in DATATYPE_TO_NUMPY if "INT" in name}
_KINDS.update({"BOOL": frozenset("b"), "FP16": _FLOAT_KINDS, "FP32": _FLOAT_KINDS})
_KINDS.update({"FP64": _FLOAT_KINDS, "BF16": _FLOAT_KINDS})
_KIND_WORDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "floats"}


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """How to send each output: binary (raw bytes after the JSON header) or JSON `data`."""

    binary_default: bool = False
    binary: Mapping[str, bool] = field(default_factory=dict)  # per-output choices

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


# -- requests ------------------------------------------------------------------------------


def parse_header_length(value: bytes | None, body_length: int) -> int | None:
    """The `Inference-Header-Content-Length` value, checked against the body's length."""
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 12:  # '²' is a digit to isdigit
        raise InvalidArgument(
            f"header Inference-Header-Content-Length {text[:32]!r} is not a byte count"
        )
    length = int(text)
    if length == 0 or length > body_length:
        raise InvalidArgument(
            f"header Inference-Header-Content-Length is {length} but the body has "
            f"{body_length} bytes; it must give the length of the JSON part (1..{body_length})"
        )
    return length


def decode_infer_request(
    body: bytes | bytearray,
    model: str,
    version: str | None = None,
    header_length: int | None = None,
) -> tuple[InferRequest, OutputFormat]:
    """Parse a v2 inference request body (JSON, or JSON header + binary tensors)."""
    view = memoryview(body)
    cut = len(view) if header_length is None else header_length
    doc = parse_json(view[:cut], "inference request")
    if not isinstance(doc, dict):
        raise InvalidArgument("the inference request must be a JSON object with 'inputs'")
    params = _parameters(doc.get("parameters"), "the request")
    inputs = _decode_inputs(doc.get("inputs"), view[cut:], header_length is not None)
    names, fmt = _decode_outputs(doc.get("outputs"), params)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a string, got {_short(request_id)}")
    timeout = params.get("timeout")
    if isinstance(timeout, int) and not isinstance(timeout, bool):
        # An integer is Triton's microseconds (what tritonclient sends); a float is seconds.
        params["timeout"] = timeout / 1e6
    variant, controls = take_controls(params)
    request = InferRequest(
        model=model,
        inputs=inputs,
        version=version,
        variant=variant,
        outputs=names,
        id=request_id,
        parameters=params,
        controls=controls,
    )
    return request, fmt


def parse_json(data: bytes | bytearray | memoryview, what: str) -> Any:
    if not data:
        raise InvalidArgument(f"the {what} is empty; send a JSON object")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        error = exc
    # NaN and Infinity are not JSON, but Triton accepts them and perf_analyzer's JSON mode
    # sends them (random bit patterns as floats): the standard library reads them, slowly,
    # only on this error path.
    raw = bytes(data)
    if b"NaN" in raw or b"Infinity" in raw:
        with contextlib.suppress(ValueError):
            return json.loads(raw)
    raise InvalidArgument(f"the {what} is not valid JSON: {error}") from None


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"'parameters' of {where} must be a JSON object")
    return value


def _decode_inputs(items: Any, binary: memoryview, has_binary: bool) -> dict[str, np.ndarray]:
    if not isinstance(items, list) or not items:
        raise InvalidArgument(
            "'inputs' must be a non-empty list of tensors "
            '({"name", "shape", "datatype", "data"} each)'
        )
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        name, datatype, shape = _tensor_header(item)
        if name in arrays:
            raise InvalidArgument(f"input {name!r} is given twice")
        size = _binary_size(item, name)
        if size is None:
            arrays[name] = json_tensor(item.get("data"), datatype, shape, name)
            continue
        if not has_binary:
            raise InvalidArgument(
                f"input {name!r} has parameters.binary_data_size but the request has no "
                "binary part; send the header Inference-Header-Content-Length: <JSON bytes>"
            )
        end = offset + size
        if end > len(binary):
            raise InvalidArgument(
                f"binary_data_size of the inputs up to {name!r} add up to {end} bytes but only "
                f"{len(binary)} bytes follow the JSON header"
            )
        arrays[name] = tensor_from_raw(binary[offset:end], datatype, shape, name, _BINARY_WHERE)
        offset = end
    if offset != len(binary):
        raise InvalidArgument(
            f"binary_data_size of the inputs add up to {offset} bytes but {len(binary)} bytes "
            "follow the JSON header; they must match"
        )
    return arrays


def _tensor_header(item: Any) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(item, dict):
        raise InvalidArgument(f"each input must be a JSON object, got {_short(item)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("each input needs a 'name' (a non-empty string)")
    datatype = item.get("datatype")
    if datatype not in DATATYPE_TO_NUMPY:
        raise InvalidArgument(
            f"input {name!r}: datatype {_short(datatype)} is not one of "
            f"{', '.join(DATATYPE_TO_NUMPY)}"
        )
    return name, datatype, _shape(item.get("shape"), name)


def _shape(value: Any, name: str) -> tuple[int, ...]:
    ok = isinstance(value, list) and len(value) <= MAX_DIMS
    if ok and all(type(d) is int and d >= 0 for d in value):
        check_extent(tuple(value), name)
        return tuple(value)
    raise InvalidArgument(
        f"input {name!r}: 'shape' must be a list of at most {MAX_DIMS} non-negative integers, "
        f"got {_short(value)}"
    )


def _binary_size(item: dict[str, Any], name: str) -> int | None:
    params = item.get("parameters")
    if params is None:
        return None
    size = _parameters(params, f"input {name!r}").get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise InvalidArgument(
            f"input {name!r}: binary_data_size must be a non-negative integer, got {_short(size)}"
        )
    if "data" in item:
        raise InvalidArgument(f"input {name!r} has both 'data' and binary_data_size; send one")
    return size


def json_tensor(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """JSON `data` (flat or nested, row-major) as an array of `shape`."""
    if not isinstance(data, list):
        raise InvalidArgument(
            f"input {name!r} needs 'data' (a list) or parameters.binary_data_size"
        )
    if datatype == "BYTES":
        array = _json_strings(data, name)
    else:
        array = _json_numbers(data, datatype, name)
    count = math.prod(shape)
    if array.size != count:
        raise InvalidArgument(
            f"input {name!r}: shape {list(shape)} holds {count} elements but 'data' has "
            f"{array.size}; make them agree"
        )
    return array.reshape(shape)


_DIRECT: dict[str, np.dtype[Any]] = {"FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64)}


def _json_numbers(data: list[Any], datatype: str, name: str) -> np.ndarray:
    direct = _DIRECT.get(datatype)
    if direct is not None and data and type(data[0]) is not bool:
        # The common case in one C loop: array('d') takes ints and floats and refuses strings,
        # nulls and nested lists (TypeError), which go the checked way below.
        try:
            doubles = np.frombuffer(double_array("d", data), dtype=np.float64)
        except (TypeError, OverflowError):
            pass
        else:
            with np.errstate(over="ignore"):  # FP32 overflow becomes inf, as a C cast would
                return doubles.astype(direct)
    try:
        array = np.asarray(data)  # dtype inferred, so strings or nulls are caught below
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"input {name!r}: 'data' is not a regular list: {exc}") from None
    kind = array.dtype.kind
    target = DATATYPE_TO_NUMPY[datatype]
    if kind == "f" and target.kind in "iu" and _integral(array):
        # Ints beyond int64 mixed with small ones infer as float64: convert them exactly.
        return _exact_ints(data, target, name)
    if kind not in _KINDS[datatype] and array.size:
        what = _KIND_WORDS.get(kind, "values that are not numbers")
        raise InvalidArgument(f"input {name!r} is {datatype} but its 'data' holds {what}")
    if datatype == "BF16":
        return float_to_bf16(array)
    if kind in "iu" and target.kind in "iu" and array.size:
        check_int_range(array, target, name)
    with np.errstate(over="ignore"):  # FP32/FP16 overflow becomes inf, as a C cast would
        return array.astype(target, copy=False)


def _integral(array: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(array)) and np.all(array == np.floor(array)))


def _exact_ints(data: list[Any], target: np.dtype[Any], name: str) -> np.ndarray:
    try:
        with np.errstate(invalid="raise", over="raise"):
            return np.asarray(data, dtype=target)
    except (OverflowError, FloatingPointError) as exc:
        raise InvalidArgument(f"input {name!r}: values do not fit {target.name} ({exc})") from None


def float_to_bf16(array: np.ndarray) -> np.ndarray:
    """Floats -> BF16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def bf16_to_float(array: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) -> float32, exactly."""
    return (array.astype(np.uint32) << 16).view(np.float32)


def _json_strings(data: list[Any], name: str) -> np.ndarray:
    try:
        nested = np.array(data, dtype=object)
    except ValueError as exc:
        raise InvalidArgument(f"input {name!r}: 'data' is not a regular list: {exc}") from None
    flat = nested.reshape(-1)
    out = np.empty(flat.size, dtype=object)
    for i, item in enumerate(flat):
        if type(item) is not str:
            raise InvalidArgument(
                f"input {name!r} is BYTES but its 'data' holds {_short(item)}; send strings"
            )
        out[i] = item.encode()
    return out.reshape(nested.shape)


def _decode_outputs(
    items: Any, params: dict[str, Any]
) -> tuple[tuple[str, ...] | None, OutputFormat]:
    default = params.get("binary_data_output", False)
    if type(default) is not bool:
        raise InvalidArgument("parameter 'binary_data_output' must be true or false")
    if items is None:
        return None, OutputFormat(default)
    if not isinstance(items, list):
        raise InvalidArgument("'outputs' must be a list of {\"name\": ...} objects")
    names: list[str] = []
    choices: dict[str, bool] = {}
    for item in items:
        name, binary = _output_request(item)
        names.append(name)
        if binary is not None:
            choices[name] = binary
    return (tuple(names) or None), OutputFormat(default, choices)


def _output_request(item: Any) -> tuple[str, bool | None]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidArgument(f"each requested output needs a 'name', got {_short(item)}")
    name = item["name"]
    params = _parameters(item.get("parameters"), f"output {name!r}")
    if params.get("classification"):
        raise Unimplemented("the classification extension is not supported; ask for raw outputs")
    binary = params.get("binary_data")
    if binary is not None and type(binary) is not bool:
        raise InvalidArgument(f"output {name!r}: binary_data must be true or false")
    return name, binary


# -- responses -----------------------------------------------------------------------------


def encode_infer_response(response: InferResponse, fmt: OutputFormat) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    outputs: list[dict[str, Any]] = []
    blobs: list[Any] = []
    for name, array in response.outputs.items():
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if fmt.is_binary(name):
            blob = binary_output(array, datatype)
            size = blob.nbytes if isinstance(blob, np.ndarray) else len(blob)
            entry["parameters"] = {"binary_data_size": size}
            blobs.append(blob)
        else:
            entry["data"] = json_output(array, datatype, name)
        outputs.append(entry)
    doc: dict[str, Any] = {
        "model_name": response.served_name,
        "model_version": response.version,
        "outputs": outputs,
    }
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    header = orjson.dumps(doc, option=_DUMPS_OPTIONS)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def json_output(array: np.ndarray, datatype: str, name: str) -> Any:
    """Flat row-major data: numeric arrays go to orjson as they are (no Python list)."""
    if datatype != "BYTES":
        return np.ascontiguousarray(array).reshape(-1)
    try:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"output {name!r} holds bytes that are not UTF-8 text; ask for it with "
            'parameters {"binary_data": true}'
        ) from None


def binary_output(array: np.ndarray, datatype: str) -> bytes | np.ndarray:
    """Raw little-endian bytes (a contiguous array is passed as its own buffer)."""
    if datatype != "BYTES":
        return np.ascontiguousarray(array)
    return pack_bytes(array)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
