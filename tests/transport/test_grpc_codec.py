"""The gRPC codec alone: our .proto against tritonclient's compiled one, tensors both ways,
parameters, and every malformed request it must refuse with a clear message."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import InferResult
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.grpc import service_pb2 as triton_pb

from slimserve.errors import InvalidArgument, Unimplemented
from slimserve.transport import grpc_codec as codec
from slimserve.transport.vendor import grpc_service_pb2 as pb
from slimserve.transport.vendor import model_config_pb2 as mc
from slimserve.types import (
    DATATYPE_TO_NUMPY,
    InferResponse,
    ModelMetadata,
    ModelSettings,
    RepositoryEntry,
    RequestControls,
    TensorSpec,
    datatype_of,
)

NUMERIC = [d for d in DATATYPE_TO_NUMPY if d not in ("BYTES", "BF16")]


# -- wire compatibility with tritonclient's own stubs ---------------------------------------


def _fields(descriptor: Any) -> dict[str, tuple[int, int, bool, str]]:
    def type_name(f: Any) -> str:
        kind = f.message_type or f.enum_type
        return kind.full_name if kind else ""

    return {f.name: (f.number, f.type, f.is_repeated, type_name(f)) for f in descriptor.fields}


def _messages(descriptor: Any) -> list[Any]:
    out = [descriptor]
    for nested in descriptor.nested_types:
        out.extend(_messages(nested))
    return out


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(pb.DESCRIPTOR, triton_pb.DESCRIPTOR), (mc.DESCRIPTOR, triton_mc.DESCRIPTOR)],
)
def test_every_message_matches_tritons_numbers_and_types(ours: Any, theirs: Any) -> None:
    assert ours.package == theirs.package == "inference"
    for top in ours.message_types_by_name.values():
        for message in _messages(top):
            reference = theirs.pool.FindMessageTypeByName(message.full_name)
            mine, triton = _fields(message), _fields(reference)
            for name, spec in mine.items():
                assert triton.get(name) == spec, f"{message.full_name}.{name}"


def test_datatype_enum_matches_triton() -> None:
    ours = {v.name: v.number for v in mc.DataType.DESCRIPTOR.values}
    theirs = {v.name: v.number for v in triton_mc.DataType.DESCRIPTOR.values}
    assert ours == theirs


def test_service_methods_are_tritons() -> None:
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService"
    assert len(ours.methods) == 11
    for method in ours.methods:
        ref = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == ref.input_type.full_name
        assert method.output_type.full_name == ref.output_type.full_name
        assert not method.client_streaming and not method.server_streaming


# -- requests ------------------------------------------------------------------------------


def raw_request(arrays: dict[str, np.ndarray], **fields: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", **fields)
    for name, array in arrays.items():
        datatype = "BYTES" if array.dtype == object else datatype_of(array)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(codec.raw_bytes(array, datatype))
    return request


def expect_invalid(request: pb.ModelInferRequest, *words: str) -> str:
    with pytest.raises(InvalidArgument) as info:
        codec.decode_infer_request(request)
    for word in words:
        assert word in info.value.message
    return info.value.message


numeric_arrays = st.sampled_from(NUMERIC).flatmap(
    lambda dt: hnp.arrays(
        DATATYPE_TO_NUMPY[dt], hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
    )
)


@settings(max_examples=60, deadline=None)
@given(numeric_arrays)
def test_raw_numeric_round_trip(array: np.ndarray) -> None:
    decoded = codec.decode_infer_request(raw_request({"x": array})).inputs["x"]
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_raw_input_is_a_view_of_the_message_buffer() -> None:
    request = raw_request({"x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    decoded = codec.decode_infer_request(request).inputs["x"]
    assert not decoded.flags.owndata and not decoded.flags.writeable


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=20), min_size=0, max_size=8))
def test_raw_bytes_round_trip(items: list[bytes]) -> None:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    decoded = codec.decode_infer_request(raw_request({"s": array})).inputs["s"]
    assert decoded.dtype == object and list(decoded) == items


@settings(max_examples=40, deadline=None)
@given(numeric_arrays)
def test_typed_contents_round_trip(array: np.ndarray) -> None:
    request = pb.ModelInferRequest(model_name="m")
    datatype = datatype_of(array)
    if datatype == "FP16":
        return  # raw only, tested below
    field = codec.CONTENTS_FIELDS[datatype][0]
    tensor = request.inputs.add(name="x", datatype=datatype, shape=array.shape)
    getattr(tensor.contents, field).extend(array.reshape(-1).tolist())
    decoded = codec.decode_infer_request(request).inputs["x"]
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_typed_bytes_contents() -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="s", datatype="BYTES", shape=[2, 1])
    tensor.contents.bytes_contents.extend([b"ab", b"\x00\xff"])
    decoded = codec.decode_infer_request(request).inputs["s"]
    assert decoded.shape == (2, 1) and decoded.ravel().tolist() == [b"ab", b"\x00\xff"]


def test_request_fields_and_parameters() -> None:
    request = raw_request({"x": np.zeros(2, np.int64)}, model_version="3", id="req-1")
    request.outputs.add(name="b")
    request.outputs.add(name="a")
    request.parameters["variant"].string_param = "int8"
    request.parameters["priority"].uint64_param = 2
    request.parameters["degrade"].bool_param = False
    request.parameters["scale"].double_param = 0.5
    decoded = codec.decode_infer_request(request, client="10.0.0.1")
    assert (decoded.model, decoded.version, decoded.id, decoded.client) == (
        "m",
        "3",
        "req-1",
        "10.0.0.1",
    )
    assert decoded.outputs == ("b", "a")
    assert decoded.parameters == {"scale": 0.5}  # the controls are typed fields
    assert decoded.variant == "int8"
    assert decoded.controls == RequestControls(priority=2, degrade=False)
    empty = codec.decode_infer_request(raw_request({"x": np.zeros(1)}))
    assert empty.version is None and empty.id is None and empty.outputs is None


def test_bad_raw_sizes_are_refused() -> None:
    request = raw_request({"x": np.zeros((2, 4), np.float32)})
    request.raw_input_contents[0] = b"\x00" * 28
    expect_invalid(request, "'x'", "needs 32 bytes", "has 28")
    two = raw_request({"x": np.zeros(2, np.float32)})
    two.raw_input_contents.append(b"")
    expect_invalid(two, "2 buffers for 1 inputs")
    huge = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\x00" * 8])
    huge.inputs.add(name="x", datatype="FP32", shape=[1 << 40, 1 << 40])
    expect_invalid(huge, "needs", "has 8")


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (struct.pack("<I", 5) + b"abcd", ("element 0 of 2", "runs past")),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 9) + b"zz", ("element 1 of 2",)),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 0) + b"!", ("1 bytes are left over",)),
        (b"\x01\x00", ("2 BYTES elements need at least 8 bytes",)),
    ],
)
def test_bad_raw_bytes_are_refused(payload: bytes, words: tuple[str, ...]) -> None:
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[payload])
    request.inputs.add(name="s", datatype="BYTES", shape=[2])
    expect_invalid(request, "'s'", *words)


def test_huge_bytes_shape_allocates_nothing() -> None:
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\x00" * 8])
    request.inputs.add(name="s", datatype="BYTES", shape=[1 << 62])
    expect_invalid(request, "need at least")


def test_bad_typed_contents_are_refused() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1, 2])
    expect_invalid(request, "holds 3 elements", "fp32_contents has 2")
    wrong = pb.ModelInferRequest(model_name="m")
    wrong.inputs.add(name="x", datatype="FP32", shape=[2]).contents.int_contents.extend([1, 2])
    expect_invalid(wrong, "fp32_contents", "filled contents.int_contents")
    half = pb.ModelInferRequest(model_name="m")
    half.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1)
    expect_invalid(half, "FP16", "raw_input_contents")
    small = pb.ModelInferRequest(model_name="m")
    small.inputs.add(name="i", datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])
    expect_invalid(small, "1..300 do not fit int8")


def test_mixing_raw_and_typed_contents_is_refused() -> None:
    request = raw_request({"x": np.zeros(2, np.float32)})
    request.inputs[0].contents.fp32_contents.extend([0, 0])
    expect_invalid(request, "has 'contents' but the request uses raw_input_contents")


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ({"name": "", "datatype": "FP32", "shape": [1]}, ("needs a name",)),
        ({"name": "x" * 5000, "datatype": "FP32", "shape": [1]}, ("5000 characters",)),
        ({"name": "x", "datatype": "FP8", "shape": [1]}, ("'FP8' is not one of",)),
        ({"name": "x", "datatype": "FP32", "shape": [-1, 2]}, ("non-negative",)),
        ({"name": "x", "datatype": "FP32", "shape": [1] * 40}, ("at most 32",)),
    ],
)
def test_bad_tensor_headers_are_refused(header: dict[str, Any], words: tuple[str, ...]) -> None:
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\x00" * 4])
    request.inputs.add(**header)
    expect_invalid(request, *words)


def test_structural_mistakes_are_refused() -> None:
    expect_invalid(pb.ModelInferRequest(model_name="m"), "no inputs")
    twice = raw_request({"x": np.zeros(1, np.float32)})
    twice.inputs.add(name="x", datatype="FP32", shape=[1])
    twice.raw_input_contents.append(b"\x00" * 4)
    expect_invalid(twice, "given twice")
    outputs = raw_request({"x": np.zeros(1, np.float32)})
    outputs.outputs.add(name="y")
    outputs.outputs.add(name="y")
    expect_invalid(outputs, "'y' is requested twice")
    unset = raw_request({"x": np.zeros(1, np.float32)})
    unset.parameters["oops"].Clear()
    expect_invalid(unset, "'oops'", "no value")
    boolean = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\x02"])
    boolean.inputs.add(name="b", datatype="BOOL", shape=[1])
    expect_invalid(boolean, "0 or 1")


def test_classification_outputs_are_unimplemented() -> None:
    request = raw_request({"x": np.zeros(1, np.float32)})
    request.outputs.add(name="y").parameters["classification"].int64_param = 3
    with pytest.raises(Unimplemented, match="classification"):
        codec.decode_infer_request(request)


# -- deadlines -----------------------------------------------------------------------------


def test_timeout_parameter_units() -> None:
    micro = pb.InferParameter(int64_param=250_000)
    assert codec.timeout_seconds(micro) == pytest.approx(0.25)
    assert codec.timeout_seconds(pb.InferParameter(double_param=1.5)) == 1.5
    assert codec.timeout_seconds(pb.InferParameter(string_param="2")) == 2.0
    for bad in (pb.InferParameter(string_param="soon"), pb.InferParameter(bool_param=True)):
        with pytest.raises(InvalidArgument, match="'timeout' must be a number"):
            codec.timeout_seconds(bad)
    request = raw_request({"x": np.zeros(1, np.float32)})
    request.parameters["timeout"].int64_param = 1_000
    assert codec.decode_infer_request(request).controls.timeout_s == pytest.approx(0.001)


def test_the_call_deadline_becomes_the_request_deadline() -> None:
    request = raw_request({"x": np.zeros(1, np.float32)})
    assert codec.decode_infer_request(request, None, None).controls.timeout_s is None
    assert codec.decode_infer_request(request, None, 2.5).controls.timeout_s == 2.5
    request.parameters["timeout"].double_param = 2.5
    # An earlier timeout the client set wins; a nearer call deadline wins over it.
    assert codec.decode_infer_request(request, None, 9.0).controls.timeout_s == 2.5
    decoded = codec.decode_infer_request(request, None, 0.5)
    assert decoded.controls.timeout_s == 0.5 and "timeout" not in decoded.parameters


# -- responses -----------------------------------------------------------------------------


def as_triton(message: Any) -> InferResult:
    """Our response, parsed by tritonclient's own stubs and result class."""
    return InferResult(triton_pb.ModelInferResponse.FromString(message.SerializeToString()))


@settings(max_examples=40, deadline=None)
@given(numeric_arrays)
def test_numeric_outputs_read_back_by_tritonclient(array: np.ndarray) -> None:
    response = InferResponse(model="m", version="1", outputs={"y": array})
    result = as_triton(codec.encode_infer_response(response))
    np.testing.assert_array_equal(result.as_numpy("y"), array)
    assert result.as_numpy("y").shape == array.shape


def test_response_fields_bytes_and_strided_outputs() -> None:
    strings = np.array([[b"a", b""], [b"\xff\x00", b"long" * 10]], dtype=object)
    strided = np.arange(12, dtype=np.float16).reshape(3, 4)[:, ::2]
    response = InferResponse(
        model="m",
        version="2",
        variant="int8",
        id="r7",
        outputs={"s": strings, "h": strided},
        parameters={"degraded": True, "n": 3, "big": 1 << 63, "f": 0.5, "list": [1]},
    )
    message = codec.encode_infer_response(response)
    result = as_triton(message)
    got = result.get_response()
    assert (got.model_name, got.model_version, got.id) == ("m:int8", "2", "r7")
    assert [o.name for o in got.outputs] == ["s", "h"]
    assert len(got.raw_output_contents) == 2
    assert result.as_numpy("s").tolist() == strings.tolist()
    np.testing.assert_array_equal(result.as_numpy("h"), strided)
    params = got.parameters
    assert params["degraded"].bool_param is True and params["n"].int64_param == 3
    assert params["big"].uint64_param == 1 << 63 and params["f"].double_param == 0.5
    assert params["list"].string_param == "[1]"


def test_big_endian_outputs_are_sent_little_endian() -> None:
    array = np.arange(4, dtype=">i4")
    assert codec.raw_bytes(array, "INT32") == np.arange(4, dtype="<i4").tobytes()


# -- metadata messages ---------------------------------------------------------------------


def test_typed_results_become_messages_tritonclient_reads() -> None:
    config = codec.model_config_message(
        ModelSettings(
            name="m",
            platform="onnxruntime_onnx",
            backend="onnx",
            max_batch_size=8,
            inputs=(TensorSpec("x", "FP32", (-1, 4)),),
            outputs=(TensorSpec("y", "BYTES", (-1, -1)),),
            batched=True,
            max_queue_delay_us=2000,
        )
    )
    theirs = triton_pb.ModelConfigResponse.FromString(config.SerializeToString()).config
    assert theirs.max_batch_size == 8 and theirs.backend == "onnx"
    assert theirs.input[0].data_type == triton_mc.TYPE_FP32 and list(theirs.input[0].dims) == [4]
    assert theirs.output[0].data_type == triton_mc.TYPE_STRING
    assert theirs.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(theirs.output[0].dims) == [-1]
    meta = codec.model_metadata_message(
        ModelMetadata("m", ("1",), "p", (TensorSpec("x", "FP32", (-1, 4)),), (), "READY")
    )
    assert list(meta.inputs[0].shape) == [-1, 4]
    index = codec.index_message([RepositoryEntry("m", "1", "READY")])
    assert index.models[0].state == "READY"


def test_bf16_travels_raw_as_its_bit_pattern() -> None:
    bits = np.array([0x3F80, 0xC000], dtype=np.uint16)  # 1.0, -2.0 in bfloat16
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[bits.tobytes()])
    request.inputs.add(name="b", datatype="BF16", shape=[2])
    decoded = codec.decode_infer_request(request).inputs["b"]
    assert decoded.dtype == np.uint16 and decoded.tolist() == [0x3F80, 0xC000]
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="b", datatype="BF16", shape=[1]).contents.fp32_contents.append(1.0)
    expect_invalid(typed, "BF16", "raw_input_contents")


def _without_json_names(messages: Any) -> None:
    for message in messages:  # protoc adds json_name to descriptor sets, not to generated code
        for field in message.field:
            field.ClearField("json_name")
        _without_json_names(message.nested_type)


def test_generated_modules_match_the_proto_files(tmp_path: Path) -> None:
    """Someone who edits a .proto must run scripts/gen_proto.sh; this notices if they did not."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    protos = Path(pb.__file__).parent
    out = tmp_path / "descriptors.pb"
    args = ["protoc", f"-I{protos}", f"--descriptor_set_out={out}"]
    assert protoc.main([*args, "model_config.proto", "grpc_service.proto"]) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    compiled = {f.name: f for f in files}
    for module in (pb, mc):
        generated = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        expected = compiled[generated.name]
        _without_json_names(expected.message_type)
        assert expected == generated, f"run scripts/gen_proto.sh to regenerate {module.__name__}"
