"""Fuzzing the request decoders directly with hypothesis: the v2 JSON decoder and the binary
tensor parser (HTTP), and ModelInferRequest decoding (gRPC).

The property, for arbitrary bytes, arbitrary JSON, requests shaped like v2 requests with
arbitrary field values, mutations of valid requests, and protobuf messages with arbitrary
field values: decoding either succeeds with arrays of the declared shapes, or raises a
`SlimserveError` (a 4xx); never any other exception. Sizes are bounded so that every case
is quick; the tests' timeout catches a hang. The round trips of valid requests and the
hand-written bad cases live in test_http_codec.py and test_grpc_codec.py.

SLIMSERVE_FUZZ_EXAMPLES sets the examples per test (benchmarks/fuzz.py raises it).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import numpy as np
import orjson
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from slimserve.errors import SlimserveError
from slimserve.transport import grpc_codec
from slimserve.transport.http_codec import decode_infer_request, parse_header_length
from slimserve.transport.limits import TensorLimits, check_inputs
from slimserve.transport.vendor import grpc_service_pb2 as pb
from slimserve.types import DATATYPES, InferRequest

pytestmark = pytest.mark.timeout(120)

EXAMPLES = int(os.environ.get("SLIMSERVE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMITS = TensorLimits(max_elements=1000, max_string_bytes=64)
# Names the decoders look for, mixed with arbitrary ones.
DATATYPE_NAMES = st.sampled_from([*DATATYPES, "FP8", "", "fp32", "STRING"])
FIELD_NAMES = st.sampled_from(
    [
        *("name", "shape", "datatype", "data", "parameters", "inputs", "outputs", "id"),
        *("binary_data_size", "binary_data", "binary_data_output", "timeout", "classification"),
    ]
)


def _http_decode(body: bytes, header: bytes | None = None) -> InferRequest | None:
    """Decode as the HTTP transport does; None when refused with a SlimserveError."""
    try:
        length = parse_header_length(header, len(body))
        request, _ = decode_infer_request(body, "m", None, length)
        check_inputs(request.inputs, LIMITS)
    except SlimserveError:
        return None
    return request


def _grpc_decode(message: pb.ModelInferRequest) -> InferRequest | None:
    try:
        request = grpc_codec.decode_infer_request(message)
        check_inputs(request.inputs, LIMITS)
    except SlimserveError:
        return None
    return request


def _shapes_hold(request: InferRequest | None) -> None:
    """A request that decoded has arrays whose sizes agree with their shapes."""
    if request is None:
        return
    assert request.inputs
    for array in request.inputs.values():
        assert isinstance(array, np.ndarray)
        assert array.size == math.prod(array.shape) <= LIMITS.max_elements


# -- HTTP: arbitrary bytes and JSON --------------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=2048), header=st.none() | st.binary(max_size=16))
@example(body=b"{}", header=b"\xb2")  # found by this test: '²'.isdigit() but int('²') fails
def test_http_arbitrary_bytes(body: bytes, header: bytes | None) -> None:
    _shapes_hold(_http_decode(body, header))


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(FIELD_NAMES | st.text(max_size=6), inner, max_size=6)
    ),
    max_leaves=40,
)


@FUZZ
@given(doc=json_values)
def test_http_arbitrary_json(doc: Any) -> None:
    _shapes_hold(_http_decode(json.dumps(doc).encode()))


# -- HTTP: requests shaped like v2 requests, with arbitrary values --------------------------

shapes = st.lists(st.integers(min_value=-2, max_value=2**40), max_size=4) | st.lists(
    st.integers(min_value=0, max_value=4), max_size=4
)
data_values = st.lists(
    json_scalars | st.lists(json_scalars, max_size=4) | st.lists(st.integers(0, 300), max_size=4),
    max_size=24,
)


@st.composite
def v2_inputs(draw: st.DrawFn) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": draw(st.sampled_from(["x", "y", ""]) | st.text(max_size=4)),
        "datatype": draw(DATATYPE_NAMES),
        "shape": draw(shapes | json_values),
    }
    if draw(st.booleans()):
        item["data"] = draw(data_values | json_values)
    if draw(st.booleans()):
        size = st.integers(min_value=-1, max_value=64) | json_values
        item["parameters"] = {"binary_data_size": draw(size)}
    return item


# numpy cannot make an empty array whose other dimensions are this large (ValueError).
EMPTY_HUGE = (
    b'{"inputs":[{"name":"x","datatype":"BOOL","shape":[0,869,103015684,103030688],'
    b'"parameters":{"binary_data_size":0}}]}'
)


@st.composite
def v2_bodies(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    doc: dict[str, Any] = {"inputs": draw(st.lists(v2_inputs(), min_size=1, max_size=3))}
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.text(max_size=3)}, optional={"parameters": json_values}
                ),
                max_size=2,
            )
            | json_values
        )
    if draw(st.booleans()):
        doc["parameters"] = draw(st.dictionaries(FIELD_NAMES, json_scalars, max_size=3))
    header = json.dumps(doc).encode()  # ints past 64 bits too
    blob = draw(st.binary(max_size=256))
    if not blob and draw(st.booleans()):
        return header, None
    return header + blob, str(len(header)).encode()


@FUZZ
@given(body=v2_bodies())
@example(body=(EMPTY_HUGE, str(len(EMPTY_HUGE)).encode()))  # found by this test: a 500
@example(body=(EMPTY_HUGE.replace(b'"parameters":{"binary_data_size":0}', b'"data":[]'), None))
def test_http_v2_shaped_requests(body: tuple[bytes, bytes | None]) -> None:
    _shapes_hold(_http_decode(*body))


# -- HTTP: mutations of valid binary requests -----------------------------------------------


def _valid_binary_request() -> tuple[bytes, int]:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    strings = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"xyz"))
    doc = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [3, 4],
                "parameters": {"binary_data_size": x.nbytes},
            },
            {
                "name": "s",
                "datatype": "BYTES",
                "shape": [3],
                "parameters": {"binary_data_size": len(strings)},
            },
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }
    header = orjson.dumps(doc)
    return header + x.tobytes() + strings, len(header)


VALID_BODY, VALID_HEADER = _valid_binary_request()


@st.composite
def mutations(draw: st.DrawFn) -> tuple[bytes, bytes]:
    body = bytearray(VALID_BODY)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(body) - 1)))
        if kind == "flip" and body:
            body[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del body[at : at + draw(st.integers(1, 8))]
        else:
            del body[at:]
    header = draw(st.sampled_from([VALID_HEADER, len(body)]) | st.integers(0, len(body) + 2))
    return bytes(body), str(header).encode()


def test_the_valid_binary_request_decodes() -> None:
    request = _http_decode(VALID_BODY, str(VALID_HEADER).encode())
    assert request is not None and request.inputs["s"].tolist() == [b"ab", b"", b"xyz"]


@FUZZ
@given(case=mutations())
def test_http_mutated_binary_requests(case: tuple[bytes, bytes]) -> None:
    _shapes_hold(_http_decode(*case))


# -- gRPC: arbitrary messages ----------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=1024))
def test_grpc_arbitrary_bytes(data: bytes) -> None:
    try:
        message = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return  # the transport answers INVALID_ARGUMENT (tested in test_grpc_server.py)
    _shapes_hold(_grpc_decode(message))


int32s = st.integers(-(2**31), 2**31 - 1)
uint32s = st.integers(0, 2**32 - 1)
int64s = st.integers(-(2**63), 2**63 - 1)
uint64s = st.integers(0, 2**64 - 1)
CONTENTS = {
    "bool_contents": st.booleans(),
    "int_contents": int32s,
    "int64_contents": int64s,
    "uint_contents": uint32s,
    "uint64_contents": uint64s,
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=80),
}


@st.composite
def parameters(draw: st.DrawFn, target: Any) -> None:
    for key in draw(st.lists(FIELD_NAMES | st.text(max_size=4), max_size=3)):
        kind = draw(st.sampled_from(["bool", "int64", "uint64", "string", "double", "none"]))
        param = target[key]
        if kind == "bool":
            param.bool_param = draw(st.booleans())
        elif kind == "int64":
            param.int64_param = draw(int64s)
        elif kind == "uint64":
            param.uint64_param = draw(uint64s)
        elif kind == "string":
            param.string_param = draw(st.text(max_size=8))
        elif kind == "double":
            param.double_param = draw(st.floats())


@st.composite
def infer_messages(draw: st.DrawFn) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(
        model_name=draw(st.text(max_size=8)), id=draw(st.text(max_size=4))
    )
    draw(parameters(message.parameters))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(int64s, max_size=3) | st.lists(st.integers(0, 5), max_size=3))
        tensor = message.inputs.add(
            name=draw(st.sampled_from(["x", "y", ""]) | st.text(max_size=300)),
            datatype=draw(DATATYPE_NAMES),
            shape=shape,
        )
        draw(parameters(tensor.parameters))
        if raw:
            message.raw_input_contents.append(draw(st.binary(max_size=128)))
        for field in draw(st.lists(st.sampled_from(sorted(CONTENTS)), max_size=2)):
            getattr(tensor.contents, field).extend(draw(st.lists(CONTENTS[field], max_size=12)))
    if raw and draw(st.booleans()):
        message.raw_input_contents.append(b"extra")
    for _ in range(draw(st.integers(0, 2))):
        output = message.outputs.add(name=draw(st.sampled_from(["o", ""]) | st.text(max_size=3)))
        draw(parameters(output.parameters))
    return message


@FUZZ
@given(message=infer_messages())
def test_grpc_messages_with_arbitrary_fields(message: pb.ModelInferRequest) -> None:
    _shapes_hold(_grpc_decode(message))
    # The same message through the wire format decodes the same way.
    _shapes_hold(_grpc_decode(pb.ModelInferRequest.FromString(message.SerializeToString())))
