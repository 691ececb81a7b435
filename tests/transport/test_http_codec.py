"""The v2 HTTP codec alone: requests built by tritonclient decode to the right arrays, our
responses decode in tritonclient to the arrays we sent, and every malformed body is refused
with a message that names what was wrong."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from slimserve.errors import InvalidArgument, Unimplemented
from slimserve.transport.http_codec import (
    OutputFormat,
    bf16_to_float,
    decode_infer_request,
    encode_infer_response,
    float_to_bf16,
    pack_bytes,
    parse_header_length,
)
from slimserve.types import InferResponse

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
NUMERIC += ["FP16", "FP32", "FP64"]


def triton_body(arrays: dict[str, np.ndarray], binary: bool, **kwargs) -> tuple[bytes, int | None]:
    """A request body exactly as tritonclient sends it."""
    inputs = []
    for name, array in arrays.items():
        datatype = "BYTES" if array.dtype == object else triton.np_to_triton_dtype(array.dtype)
        item = triton.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array, binary_data=binary)
        inputs.append(item)
    body, length = triton.InferenceServerClient.generate_request_body(inputs, **kwargs)
    return body, length


def decode(doc_or_body, header_length=None, model="m"):
    body = doc_or_body if isinstance(doc_or_body, bytes) else orjson.dumps(doc_or_body)
    return decode_infer_request(body, model, None, header_length)


def one_input(data, datatype="FP32", shape=None, **extra):
    shape = shape if shape is not None else [len(data)]
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data, **extra}]}


# -- JSON tensors ---------------------------------------------------------------------------


def test_flat_and_nested_json_data_give_the_same_array():
    flat, _ = decode(one_input([1, 2, 3, 4, 5, 6], shape=[2, 3]))
    nested, _ = decode(one_input([[1, 2, 3], [4, 5, 6]], shape=[2, 3]))
    expected = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    for request in (flat, nested):
        x = request.inputs["x"]
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize(
    "datatype,data,dtype",
    [
        ("INT8", [-128, 127], np.int8),
        ("UINT64", [0, 2**64 - 1], np.uint64),
        ("BOOL", [True, False], np.bool_),
        ("FP64", [1, 2.5], np.float64),
        ("FP16", [0.5, -2], np.float16),
    ],
)
def test_json_numbers_take_the_declared_dtype(datatype, data, dtype):
    request, _ = decode(one_input(data, datatype))
    assert request.inputs["x"].dtype == dtype
    np.testing.assert_array_equal(request.inputs["x"], np.array(data, dtype=dtype))


def test_json_bytes_become_utf8_bytes_in_an_object_array():
    request, _ = decode(one_input([["héllo", ""], ["a", "b"]], "BYTES", shape=[2, 2]))
    x = request.inputs["x"]
    assert x.dtype == object and x.shape == (2, 2)
    assert x.tolist() == [["héllo".encode(), b""], [b"a", b"b"]]


def test_bf16_json_rounds_to_nearest_even_and_back():
    values = np.array([1.0, -2.5, 3.14159, 1e-3], dtype=np.float32)
    request, _ = decode(one_input(values.tolist(), "BF16"))
    bits = request.inputs["x"]
    assert bits.dtype == np.uint16
    back = bf16_to_float(bits)
    np.testing.assert_allclose(back, values, rtol=2**-8)
    # 1 + 2^-8 + 2^-9 lies above the halfway point between two bf16 values: rounds up
    assert float_to_bf16(np.array([1 + 2**-8 + 2**-9]))[0] == 0x3F81


def test_nan_and_infinity_are_read_as_triton_and_perf_analyzer_write_them():
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], '
    body += b'"data": [NaN, -Infinity, 1.5]}]}'
    request, _ = decode(body)
    x = request.inputs["x"]
    assert np.isnan(x[0]) and x[1] == -np.inf and x[2] == 1.5
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        decode(body.replace(b"1.5", b"1.5,,"))


def test_request_fields_pass_through():
    doc = one_input([1.0])
    doc.update(id="req-7", parameters={"timeout": 2.5, "variant": "int8", "custom": [1]})
    doc["outputs"] = [{"name": "a"}, {"name": "b", "parameters": {"binary_data": True}}]
    request, fmt = decode(doc, model="mlp:int8")
    assert request.model == "mlp:int8" and request.id == "req-7"
    assert request.parameters == {"custom": [1]}  # the controls are typed fields
    assert request.variant == "int8" and request.controls.timeout_s == 2.5
    assert request.outputs == ("a", "b")
    assert fmt.is_binary("b") and not fmt.is_binary("a")


def test_binary_data_output_sets_the_default_and_outputs_override_it():
    doc = one_input([1.0], parameters=None)
    doc["parameters"] = {"binary_data_output": True}
    doc["outputs"] = [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}]
    _, fmt = decode(doc)
    assert not fmt.is_binary("a") and fmt.is_binary("b") and fmt.is_binary("unlisted")
    _, plain = decode(one_input([1.0]))
    assert plain == OutputFormat() and not plain.is_binary("a")


# -- binary tensors -------------------------------------------------------------------------


def test_binary_inputs_are_read_only_views_of_the_body():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([[1, -2]], dtype=np.int64)
    body, length = triton_body({"a": a, "b": b}, binary=True)
    assert length is not None
    buffer = bytearray(body)
    request, fmt = decode_infer_request(buffer, "m", "3", length)
    assert request.version == "3"
    np.testing.assert_array_equal(request.inputs["a"], a)
    np.testing.assert_array_equal(request.inputs["b"], b)
    assert np.shares_memory(request.inputs["a"], np.frombuffer(buffer, np.uint8))
    assert fmt.binary_default  # tritonclient asks for binary outputs when none are listed


def test_binary_bytes_input():
    strings = np.array([b"abc", b"", "ü".encode(), b"\x00\xff"], dtype=object).reshape(2, 2)
    body, length = triton_body({"s": strings}, binary=True)
    request, _ = decode(body, length)
    assert request.inputs["s"].tolist() == strings.tolist()


def test_header_length_equal_to_the_body_is_plain_json():
    # perf_analyzer sends Inference-Header-Content-Length even for JSON requests.
    body = orjson.dumps(one_input([1.0, 2.0]))
    request, _ = decode(body, parse_header_length(str(len(body)).encode(), len(body)))
    np.testing.assert_array_equal(request.inputs["x"], [1.0, 2.0])


# -- round trips with a real client (hypothesis) --------------------------------------------

_JSON_SAFE = {"allow_nan": False, "allow_infinity": False}


@st.composite
def tensors(draw, binary: bool) -> np.ndarray:
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
    datatype = draw(st.sampled_from([*NUMERIC, "BYTES"]))
    if datatype == "BYTES":
        items = st.binary(max_size=8) if binary else st.text(max_size=6).map(str.encode)
        return draw(hnp.arrays(object, shape, elements=items))
    dtype = np.dtype(triton.triton_to_np_dtype(datatype))
    floats = st.floats(width=dtype.itemsize * 8, **_JSON_SAFE)
    elements = None if binary or dtype.kind != "f" else floats
    return draw(hnp.arrays(dtype, shape, elements=elements))


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object and got.tolist() == want.tolist()
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("binary", [False, True])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_tritonclient_requests_round_trip(binary, data):
    arrays = {f"in{i}": data.draw(tensors(binary)) for i in range(data.draw(st.integers(1, 3)))}
    body, length = triton_body(arrays, binary)
    request, _ = decode(body, length)
    assert list(request.inputs) == list(arrays)
    for name, want in arrays.items():
        _same(request.inputs[name], want)


@pytest.mark.parametrize("binary", [False, True])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_responses_round_trip_through_tritonclient(binary, data):
    outputs = {f"out{i}": data.draw(tensors(binary)) for i in range(data.draw(st.integers(1, 3)))}
    response = InferResponse("m", "2", outputs, variant="v", id="abc")
    body, length = encode_infer_response(response, OutputFormat(binary_default=binary))
    assert (length is not None) == binary
    result = triton.InferResult.from_response_body(body, header_length=length)
    meta = result.get_response()
    assert meta["model_name"] == "m:v" and meta["model_version"] == "2" and meta["id"] == "abc"
    for name, want in outputs.items():
        got = result.as_numpy(name)
        if want.dtype == object and not binary:
            # tritonclient leaves JSON strings as str; the server sent each element's text
            got = np.array([s.encode() for s in got.reshape(-1)], dtype=object).reshape(got.shape)
        _same(got, want)


def test_json_float32_output_is_shortest_text_and_exact():
    values = np.array([[0.1, 1 / 3, -7.25]], dtype=np.float32)
    body, _ = encode_infer_response(InferResponse("m", "1", {"y": values}), OutputFormat())
    doc = orjson.loads(body)
    assert doc["outputs"][0]["shape"] == [1, 3]
    assert b"0.1," in body  # float32 text, not float64 digits
    np.testing.assert_array_equal(np.array(doc["outputs"][0]["data"], np.float32), values[0])


def test_mixed_binary_and_json_outputs():
    outputs = {"a": np.arange(3, dtype=np.int32), "b": np.array([b"xy"], dtype=object)}
    fmt = OutputFormat(binary={"a": True})
    body, length = encode_infer_response(InferResponse("m", "1", outputs), fmt)
    header = orjson.loads(body[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert header["outputs"][1]["data"] == ["xy"]
    assert body[length:] == np.arange(3, dtype=np.int32).tobytes()


def test_fixed_width_string_outputs_are_bytes_tensors():
    outputs = {"s": np.array([b"ab", b"c"]), "u": np.array(["x", "yz"])}  # dtypes S2 and U2
    body, _ = encode_infer_response(InferResponse("m", "1", outputs), OutputFormat())
    doc = orjson.loads(body)
    assert [o["datatype"] for o in doc["outputs"]] == ["BYTES", "BYTES"]
    assert [o["data"] for o in doc["outputs"]] == [["ab", "c"], ["x", "yz"]]
    body, length = encode_infer_response(InferResponse("m", "1", outputs), OutputFormat(True))
    assert body[length:] == pack_bytes(np.array([b"ab", b"c", b"x", b"yz"], dtype=object))


def test_pack_bytes_is_length_prefixed():
    packed = pack_bytes(np.array([b"ab", "c"], dtype=object))
    assert packed == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"


# -- bad input ------------------------------------------------------------------------------


def _binary(json_items, blob: bytes) -> tuple[bytes, int]:
    header = orjson.dumps({"inputs": json_items})
    return header + blob, len(header)


def _bin_input(size, datatype="FP32", shape=(2,), **extra):
    params = {"binary_data_size": size}
    return {"name": "x", "datatype": datatype, "shape": list(shape), "parameters": params, **extra}


def _x(**fields):
    item = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}
    item.update(fields)
    return {"inputs": [item]}


BAD_JSON = [
    (b"", "empty"),
    (b"{bad", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"{}", "'inputs' must be a non-empty list"),
    (b'{"inputs": []}', "non-empty list"),
    (b'{"inputs": [1]}', "must be a JSON object"),
    (_x(name=""), "'name'"),
    (_x(datatype="FLOAT"), "datatype 'FLOAT' is not one of"),
    (_x(shape="2"), "'shape' must be a list"),
    (_x(shape=[-1]), "non-negative integers"),
    (_x(shape=[True]), "non-negative integers"),
    (_x(shape=[1] * 33), "at most 32"),
    (_x(data=None), "needs 'data'"),
    (_x(data=[1, 2, 3]), "shape [2] holds 2 elements but 'data' has 3"),
    (_x(shape=[10**12, 10**12], data=[1]), "holds 1000000000000000000000000 elements"),
    (_x(shape=[2, 2], data=[[1, 2], [3]]), "not a regular list"),
    (_x(data=["a", "b"]), "holds values that are not numbers"),
    (_x(data=[None, 1]), "holds values that are not numbers"),
    (_x(data=[1.5, None]), "holds values that are not numbers"),
    (_x(datatype="FP64", data=[1.5, "2"]), "holds values that are not numbers"),
    (_x(data=[True, False]), "holds booleans"),
    (_x(data=[{"a": 1}, 1]), "holds values that are not numbers"),
    (_x(datatype="INT32", data=[1.5, 2]), "INT32 but its 'data' holds floats"),
    (_x(datatype="UINT8", data=[300, 1]), "values 1..300 do not fit uint8"),
    (
        # orjson reads an integer beyond 64 bits as a float
        orjson.dumps(_x(datatype="INT64")).replace(b"[1,2]", b"[18446744073709551616,1]"),
        "do not fit int64",
    ),
    (_x(datatype="UINT64", data=[-1, 2**64 - 1]), "-1 out of bounds for uint64"),
    (_x(datatype="BOOL", data=[1, 0]), "BOOL but its 'data' holds integers"),
    (_x(datatype="BYTES", data=[1, 2]), "BYTES but its 'data' holds 1"),
    ({"inputs": [_x()["inputs"][0], _x()["inputs"][0]]}, "given twice"),
    ({**_x(), "id": 5}, "'id' must be a string"),
    ({**_x(), "parameters": [1]}, "'parameters' of the request must be a JSON object"),
    ({**_x(), "outputs": {"name": "y"}}, "'outputs' must be a list"),
    ({**_x(), "outputs": [{"nom": "y"}]}, "needs a 'name'"),
    ({**_x(), "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}, "true or false"),
    ({**_x(), "parameters": {"binary_data_output": "yes"}}, "binary_data_output"),
    ({"inputs": [_bin_input(8)]}, "no binary part"),
]


@pytest.mark.parametrize("doc,message", BAD_JSON)
def test_bad_json_requests_say_what_is_wrong(doc, message):
    with pytest.raises(InvalidArgument) as info:
        decode(doc)
    assert message in info.value.message


BAD_BINARY = [
    ([_bin_input(8)], b"\0" * 12, "add up to 8 bytes but 12 bytes follow"),
    ([_bin_input(16)], b"\0" * 8, "add up to 16 bytes but only 8"),
    ([_bin_input(12, shape=(3,))], b"\0" * 8, "add up to 12 bytes but only 8"),
    ([_bin_input(4)], b"\0" * 4, "needs 8 bytes but its binary data (binary_data_size) has 4"),
    ([_bin_input(-1)], b"", "non-negative integer"),
    ([_bin_input(8, data=[1, 2])], b"\0" * 8, "both 'data' and binary_data_size"),
    ([_bin_input(8, "BYTES", shape=(10**9,))], b"\0" * 8, "need at least 4000000000 bytes"),
    ([_bin_input(7, "BYTES", shape=(1,))], struct.pack("<I", 9) + b"abc", "runs past"),
    ([_bin_input(9, "BYTES", shape=(1,))], struct.pack("<I", 1) + b"abcde", "4 bytes are left"),
    ([_bin_input(8, "BYTES", shape=(2,))], struct.pack("<I", 3) + b"abc\0", "1 of 2 is cut off"),
    ([_bin_input(6, "BYTES", shape=(2,))], struct.pack("<I", 0) + b"ab", "need at least 8 bytes"),
]


@pytest.mark.parametrize("items,blob,message", BAD_BINARY)
def test_bad_binary_requests_say_what_is_wrong(items, blob, message):
    body, length = _binary(items, blob)
    with pytest.raises(InvalidArgument) as info:
        decode(body, length)
    assert message in info.value.message


@pytest.mark.parametrize(
    "value,message", [(b"abc", "not a byte count"), (b"0", "1..10"), (b"11", "body has 10 bytes")]
)
def test_bad_header_length(value, message):
    with pytest.raises(InvalidArgument) as info:
        parse_header_length(value, 10)
    assert message in info.value.message


def test_classification_is_unimplemented():
    doc = {**_x(), "outputs": [{"name": "y", "parameters": {"classification": 3}}]}
    with pytest.raises(Unimplemented, match="classification"):
        decode(doc)


def test_non_utf8_bytes_output_cannot_be_json():
    outputs = {"s": np.array([b"\xff\xfe"], dtype=object)}
    with pytest.raises(InvalidArgument, match="binary_data"):
        encode_infer_response(InferResponse("m", "1", outputs), OutputFormat())
    body, length = encode_infer_response(InferResponse("m", "1", outputs), OutputFormat(True))
    assert body[length:] == struct.pack("<I", 2) + b"\xff\xfe"
