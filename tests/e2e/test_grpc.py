"""KServe v2 over gRPC against a real `slimserve serve` process, with tritonclient.grpc and
with tritonclient's own compiled stubs for requests its high-level API will not build."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import Repo, ServerProcess, mlp_reference, start_server, stop_server

pytestmark = pytest.mark.timeout(120)

MAX_BODY = 256 * 1024  # the server's --max-body-bytes, small so the oversize test is cheap
ECHO_YAML = """\
backend: python
model_class: grpc_echo:TextEcho
inputs:
  - {name: text, datatype: BYTES, shape: [-1, 2]}
  - {name: half, datatype: FP16, shape: [-1, 3]}
outputs:
  - {name: text_out, datatype: BYTES, shape: [-1, 2]}
  - {name: twice, datatype: FP16, shape: [-1, 3]}
batching: {max_batch_size: 4, max_queue_delay_ms: 1}
"""


@pytest.fixture(scope="module", params=["native", "grpcio"])
def served(
    model_repo: Repo, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    """The test repository plus 'echo' (BYTES and FP16, python backend), served with model
    control and a small message limit, by each gRPC implementation (`--grpc-server`)."""
    root = tmp_path_factory.mktemp("grpc") / "models"
    shutil.copytree(model_repo.root, root)
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "model.yaml").write_text(ECHO_YAML)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(Path(__file__).parent), prepend=":")
        proc = start_server(
            root,
            root.parent / "server.log",
            "--model-control",
            "--max-body-bytes",
            str(MAX_BODY),
            "--grpc-server",
            request.param,
        )
    yield proc
    stop_server(proc)
    assert proc.process.returncode == 0, f"server did not stop cleanly:\n{proc.log()}"


@pytest.fixture(scope="module")
def client(served: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(served.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def stub(served: ServerProcess) -> Iterator[tpb_grpc.GRPCInferenceServiceStub]:
    """tritonclient's compiled stub, for hand-built (and hostile) messages."""
    with grpc.insecure_channel(served.grpc_url) as channel:
        yield tpb_grpc.GRPCInferenceServiceStub(channel)


def mlp_input(x: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def raw_request(x: np.ndarray, model: str = "mlp", **fields: Any) -> tpb.ModelInferRequest:
    request = tpb.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def assert_good_infer(client: grpcclient.InferenceServerClient, repo: Repo) -> None:
    x = rows(2, seed=99)
    result = client.infer("mlp", [mlp_input(x)])
    np.testing.assert_allclose(
        result.as_numpy("logits"), mlp_reference(repo.weights["mlp/2"], x), rtol=1e-5, atol=1e-5
    )


# -- health, metadata, configuration -------------------------------------------------------


def test_health_and_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "slimserve" and meta["version"]
    assert "model_repository" in meta["extensions"]


def test_model_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("mlp", as_json=True)
    assert meta["name"] == "mlp" and meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "3"]}]
    variant = client.get_model_metadata("mlp:fast", model_version="2", as_json=True)
    assert variant["name"] == "mlp:fast"
    echo = client.get_model_metadata("echo")
    assert [(t.name, t.datatype) for t in echo.inputs] == [("text", "BYTES"), ("half", "FP16")]


def test_model_config(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("mlp").config
    assert (config.name, config.platform, config.max_batch_size) == ("mlp", "onnxruntime_onnx", 8)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("input", 11, [4])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [3])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    echo = client.get_model_config("echo", as_json=True)["config"]
    assert [i["data_type"] for i in echo["input"]] == ["TYPE_STRING", "TYPE_FP16"]


def test_model_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert client.is_model_ready("mlp:fast")
    assert not client.is_model_ready("broken")
    with pytest.raises(InferenceServerException) as info:
        client.is_model_ready("no-such-model")
    assert info.value.status() == "StatusCode.NOT_FOUND"


# -- inference -----------------------------------------------------------------------------


def test_infer_raw_inputs(client: grpcclient.InferenceServerClient, model_repo: Repo) -> None:
    x = rows(3)
    result = client.infer("mlp", [mlp_input(x)], request_id="req-42", client_timeout=30)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-42", "mlp", "2")
    np.testing.assert_allclose(
        result.as_numpy("logits"), mlp_reference(model_repo.weights["mlp/2"], x), rtol=1e-5
    )
    older = client.infer("mlp", [mlp_input(x)], model_version="1")
    np.testing.assert_allclose(
        older.as_numpy("logits"), mlp_reference(model_repo.weights["mlp/1"], x), rtol=1e-5
    )


def test_infer_variant_by_name_and_by_parameter(
    client: grpcclient.InferenceServerClient, model_repo: Repo
) -> None:
    x = rows(2, seed=1)
    expected = mlp_reference(model_repo.weights["mlp/2:fast"], x)
    by_name = client.infer("mlp:fast", [mlp_input(x)])
    by_param = client.infer("mlp", [mlp_input(x)], parameters={"variant": "fast"})
    for result in (by_name, by_param):
        assert result.get_response().model_name == "mlp:fast"
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)


def test_infer_typed_contents_and_requested_outputs(
    stub: tpb_grpc.GRPCInferenceServiceStub, model_repo: Repo
) -> None:
    x = rows(2, seed=2)
    request = tpb.ModelInferRequest(model_name="mlp", id="typed")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(
        x.ravel().tolist()
    )
    request.outputs.add(name="logits")
    request.parameters["timeout"].double_param = 30.0
    response = stub.ModelInfer(request)
    assert response.id == "typed" and [o.name for o in response.outputs] == ["logits"]
    assert list(response.outputs[0].shape) == [2, 3] and response.outputs[0].datatype == "FP32"
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 3)
    np.testing.assert_allclose(got, mlp_reference(model_repo.weights["mlp/2"], x), rtol=1e-5)


def test_infer_bytes_and_fp16(client: grpcclient.InferenceServerClient) -> None:
    text = np.array([[b"hello", b""], [b"\x00\xff binary", "ünïcode".encode()]], dtype=object)
    half = np.array([[0.5, -1, 2], [65504 / 2, 0.125, 3]], dtype=np.float16)
    inputs = [
        grpcclient.InferInput("text", [2, 2], "BYTES"),
        grpcclient.InferInput("half", [2, 3], "FP16"),
    ]
    inputs[0].set_data_from_numpy(text)
    inputs[1].set_data_from_numpy(half)
    outputs = [
        grpcclient.InferRequestedOutput("twice"),
        grpcclient.InferRequestedOutput("text_out"),
    ]
    result = client.infer("echo", inputs, outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["twice", "text_out"]
    assert result.as_numpy("text_out").tolist() == text.tolist()
    np.testing.assert_array_equal(result.as_numpy("twice"), half * 2)


def test_infer_typed_bytes_contents(stub: tpb_grpc.GRPCInferenceServiceStub) -> None:
    request = tpb.ModelInferRequest(model_name="echo")
    text = request.inputs.add(name="text", datatype="BYTES", shape=[1, 2])
    text.contents.bytes_contents.extend([b"a", b"bc"])
    half = request.inputs.add(name="half", datatype="FP16", shape=[1, 3])
    # FP16 has no typed field: a request using typed contents cannot carry it.
    half.contents.fp32_contents.extend([1, 2, 3])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FP16" in info.value.details() and "raw_input_contents" in info.value.details()


def test_both_transports_answer_alike(
    client: grpcclient.InferenceServerClient, served: ServerProcess
) -> None:
    x = rows(4, seed=3)
    over_grpc = client.infer("mlp:fast", [mlp_input(x)]).as_numpy("logits")
    with httpclient.InferenceServerClient(served.http_url) as http:
        tensor = httpclient.InferInput("input", [4, 4], "FP32")
        tensor.set_data_from_numpy(x)
        over_http = http.infer("mlp:fast", [tensor]).as_numpy("logits")
    np.testing.assert_array_equal(over_grpc, over_http)


def test_statistics(client: grpcclient.InferenceServerClient) -> None:
    client.infer("mlp", [mlp_input(rows(3, seed=4))])
    stats = client.get_inference_statistics("mlp", as_json=True)["model_stats"]
    default = next(s for s in stats if s["version"] == "2")
    assert default["name"] == "mlp" and int(default["inference_count"]) >= 3
    success = default["inference_stats"]["success"]
    assert int(success["count"]) >= 1 and int(success["ns"]) > 0
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {"mlp", "mlp:fast", "echo"} <= {s["name"] for s in everything}


# -- repository ----------------------------------------------------------------------------


def test_repository_index_unload_and_load(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    states = {(m["name"], m.get("version", "")): m.get("state") for m in index}
    assert states[("mlp", "2")] == "READY" and states[("mlp:fast", "2")] == "READY"
    assert states[("broken", "1")] == "UNAVAILABLE"
    ready = client.get_model_repository_index(as_json=True)
    assert "broken" not in {m["name"] for m in ready["models"] if m.get("state") == "READY"}

    client.unload_model("echo")
    assert not client.is_model_ready("echo")
    client.load_model("echo")
    assert client.is_model_ready("echo")


@pytest.mark.parametrize(
    ("model", "status", "words"),
    [
        ("no-such-model", "NOT_FOUND", "no-such-model"),
        ("broken", "FAILED_PRECONDITION", "broken"),
        ("mlp:fast", "INVALID_ARGUMENT", "variants load with it"),
        ("..", "INVALID_ARGUMENT", "invalid model name"),
    ],
)
def test_bad_loads(
    client: grpcclient.InferenceServerClient, model: str, status: str, words: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.load_model(model)
    assert info.value.status() == f"StatusCode.{status}"
    assert words in info.value.message()


def test_load_with_a_config_override_is_unimplemented(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.load_model("echo", config='{"max_batch_size": 2}')
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"


def test_rpcs_not_served_are_unimplemented(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_system_shared_memory_status()
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"


# -- bad input: the right status, a clear message, and the next good request works ----------


def _mutate(change: Callable[[tpb.ModelInferRequest], None]) -> tpb.ModelInferRequest:
    request = raw_request(rows(2))
    change(request)
    return request


def _param(request: tpb.ModelInferRequest, key: str, **value: Any) -> tpb.ModelInferRequest:
    request.parameters[key].MergeFrom(tpb.InferParameter(**value))
    return request


BAD_REQUESTS: list[tuple[str, Callable[[], tpb.ModelInferRequest], str, str]] = [
    ("unknown model", lambda: raw_request(rows(1), "no-such-model"), "NOT_FOUND", "no-such"),
    ("unknown variant", lambda: raw_request(rows(1), "mlp:nope"), "NOT_FOUND", "nope"),
    ("unknown version", lambda: raw_request(rows(1), model_version="9"), "NOT_FOUND", "9"),
    ("bad version", lambda: raw_request(rows(1), model_version="abc"), "INVALID_ARGUMENT", "abc"),
    ("dot-dot", lambda: raw_request(rows(1), ".."), "INVALID_ARGUMENT", "invalid model name"),
    ("path", lambda: raw_request(rows(1), "../mlp"), "INVALID_ARGUMENT", "invalid model name"),
    ("percent", lambda: raw_request(rows(1), "%00"), "INVALID_ARGUMENT", "invalid model name"),
    ("nul", lambda: raw_request(rows(1), "mlp\x00"), "INVALID_ARGUMENT", "invalid model name"),
    ("empty name", lambda: raw_request(rows(1), ""), "INVALID_ARGUMENT", "invalid model name"),
    ("5000 chars", lambda: raw_request(rows(1), "m" * 5000), "INVALID_ARGUMENT", "invalid"),
    (
        "wrong input name",
        lambda: _mutate(lambda r: setattr(r.inputs[0], "name", "nope")),
        "INVALID_ARGUMENT",
        "has no input 'nope'",
    ),
    (
        "wrong datatype",
        lambda: _mutate(lambda r: setattr(r.inputs[0], "datatype", "INT32")),
        "INVALID_ARGUMENT",
        "expects datatype FP32",
    ),
    (
        "unknown datatype",
        lambda: _mutate(lambda r: setattr(r.inputs[0], "datatype", "FP8")),
        "INVALID_ARGUMENT",
        "'FP8' is not one of",
    ),
    (
        "wrong shape",
        lambda: _mutate(
            lambda r: (r.inputs[0].ClearField("shape"), r.inputs[0].shape.extend([4, 2]))
        ),
        "INVALID_ARGUMENT",
        "expects shape",
    ),
    (
        "raw size off",
        lambda: _mutate(lambda r: r.raw_input_contents.__setitem__(0, b"\x00" * 28)),
        "INVALID_ARGUMENT",
        "needs 32 bytes",
    ),
    (
        "extra raw buffer",
        lambda: _mutate(lambda r: r.raw_input_contents.append(b"\x00" * 4)),
        "INVALID_ARGUMENT",
        "2 buffers for 1 inputs",
    ),
    (
        "typed data length off",
        lambda: _mutate(
            lambda r: (
                r.ClearField("raw_input_contents"),
                r.inputs[0].contents.fp32_contents.extend([1.0] * 7),
            )
        ),
        "INVALID_ARGUMENT",
        "holds 8 elements but contents.fp32_contents has 7",
    ),
    (
        "raw and typed",
        lambda: _mutate(lambda r: r.inputs[0].contents.fp32_contents.extend([1.0] * 8)),
        "INVALID_ARGUMENT",
        "uses raw_input_contents",
    ),
    (
        "no data at all",
        lambda: _mutate(lambda r: r.ClearField("raw_input_contents")),
        "INVALID_ARGUMENT",
        "fp32_contents has 0",
    ),
    (
        "unknown output",
        lambda: _mutate(lambda r: r.outputs.add(name="probs")),
        "INVALID_ARGUMENT",
        "has no output 'probs'",
    ),
    (
        "over max batch",
        lambda: raw_request(rows(9)),
        "INVALID_ARGUMENT",
        "max_batch_size is 8",
    ),
    (
        "variant twice",
        lambda: _param(raw_request(rows(1), "mlp:fast"), "variant", string_param="other"),
        "INVALID_ARGUMENT",
        "variant given twice",
    ),
    (
        "bad timeout",
        lambda: _param(raw_request(rows(1)), "timeout", string_param="soon"),
        "INVALID_ARGUMENT",
        "'timeout' must be a number",
    ),
    (
        "timeout already passed",
        lambda: _param(raw_request(rows(1)), "timeout", int64_param=0),
        "DEADLINE_EXCEEDED",
        "timeout",
    ),
    (
        "oversized message",
        lambda: raw_request(np.zeros((MAX_BODY // 16 + 1, 4), np.float32)),
        "RESOURCE_EXHAUSTED",
        "larger than",
    ),
]


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(
    stub: tpb_grpc.GRPCInferenceServiceStub,
    client: grpcclient.InferenceServerClient,
    model_repo: Repo,
    make: Callable[[], tpb.ModelInferRequest],
    status: str,
    words: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(make(), timeout=30)
    assert info.value.code() == getattr(grpc.StatusCode, status), info.value.details()
    assert words in info.value.details()
    assert len(info.value.details()) < 600  # a 5,000-character name is not echoed whole
    assert_good_infer(client, model_repo)


def test_hostile_names_on_every_model_rpc(client: grpcclient.InferenceServerClient) -> None:
    calls = [
        client.get_model_metadata,
        client.get_model_config,
        client.get_inference_statistics,
        client.is_model_ready,
        client.unload_model,
    ]
    for name in ("..", "%00", "x" * 5000, "a/b"):
        for call in calls:
            with pytest.raises(InferenceServerException) as info:
                call(name)
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT", (call, name)
            assert "invalid model name" in info.value.message()
    assert client.is_model_ready("mlp")


@pytest.mark.parametrize(
    "payload",
    [b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff not protobuf", b"\x0a\x05mlp"],
    ids=["invalid utf-8 name", "garbage", "truncated"],
)
def test_malformed_messages_are_invalid_argument(
    served: ServerProcess,
    client: grpcclient.InferenceServerClient,
    model_repo: Repo,
    payload: bytes,
) -> None:
    with grpc.insecure_channel(served.grpc_url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest message" in info.value.details()
    assert_good_infer(client, model_repo)
    assert "DecodeError" not in served.log()  # refused quietly, no traceback per request
