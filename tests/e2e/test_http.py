"""KServe v2 over HTTP against a real `slimserve serve` process: tritonclient.http (JSON and
binary), curl for JSON and for every kind of bad input, and raw sockets for bodies over the
limit. After each bad request the next good one must still succeed."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import Repo, ServerProcess, mlp_reference, start_server, stop_server

pytestmark = pytest.mark.timeout(180)

X = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
GOOD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
CURL = shutil.which("curl")

# A python-backend model with BYTES tensors. The class is imported from the server's Python
# path (PYTHONPATH below), never from the model folder.
TEXT_MODULE = """\
import numpy as np

class Upper:

    def predict(self, inputs):
        s = inputs["s"]
        upper = np.array([b.upper() for b in s.reshape(-1)], dtype=object).reshape(s.shape)
        return {"upper": upper, "length": np.array([len(b) for b in s], dtype=np.int32)}
"""
TEXT_YAML = """\
backend: python
model_class: slimserve_http_e2e_text:Upper
inputs:  [{name: s, datatype: BYTES, shape: [-1]}]
outputs: [{name: upper, datatype: BYTES, shape: [-1]}, {name: length, datatype: INT32, shape: [-1]}]
batching: {max_batch_size: 8, max_queue_delay_ms: 1}
"""
SMALL_LIMIT = 1 << 20  # --max-body-bytes of the second server


@pytest.fixture(scope="module")
def text_server(
    model_repo: Repo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A second server (its own copy of the repository plus a BYTES model), with a 1 MiB body
    limit and model control, so that loading and unloading here disturbs no other test."""
    work = tmp_path_factory.mktemp("http-e2e")
    root = work / "models"
    shutil.copytree(model_repo.root, root)
    (root / "text" / "1").mkdir(parents=True)
    (root / "text" / "model.yaml").write_text(TEXT_YAML)
    (work / "py").mkdir()
    (work / "py" / "slimserve_http_e2e_text.py").write_text(TEXT_MODULE)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(work / "py"), old) if p)
    try:
        proc = start_server(
            root, work / "server.log", "--model-control", "--max-body-bytes", str(SMALL_LIMIT)
        )
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    yield proc
    stop_server(proc)
    assert proc.process.returncode == 0, proc.log()


def client(server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.http_url)


def infer_mlp(server, model="mlp", binary=True, outputs=True, **kwargs) -> triton.InferResult:
    item = triton.InferInput("input", list(X.shape), "FP32")
    item.set_data_from_numpy(X, binary_data=binary)
    wanted = [triton.InferRequestedOutput("logits", binary_data=binary)] if outputs else None
    return client(server).infer(model, [item], outputs=wanted, **kwargs)


def curl(server, path: str, *args: str) -> tuple[int, dict]:
    assert CURL, "curl is needed for these tests"
    url = f"http://{server.http_url}{path}"
    done = subprocess.run(
        [CURL, "-sS", "--path-as-is", "-w", "\n%{http_code}", *args, url],
        capture_output=True,
        check=True,
        timeout=30,
    )
    body, _, code = done.stdout.rpartition(b"\n")
    return int(code), json.loads(body) if body else {}


def assert_still_serving(server) -> None:
    status, doc = curl(server, "/v2/models/mlp/infer", "-d", json.dumps(GOOD))
    assert status == 200, doc
    assert doc["outputs"][0]["shape"] == [1, 3]


# -- tritonclient ---------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_infer_json_and_binary(server, model_repo, binary):
    result = infer_mlp(server, binary=binary, request_id="req-42")
    expected = mlp_reference(model_repo.weights["mlp/2"], X)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    meta = result.get_response()
    assert meta["id"] == "req-42" and meta["model_version"] == "2"
    has_binary = "parameters" in meta["outputs"][0]
    assert has_binary == binary


def test_tritonclient_defaults_ask_for_binary_outputs(server, model_repo):
    result = infer_mlp(server, binary=True, outputs=False)
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 24
    expected = mlp_reference(model_repo.weights["mlp/2"], X)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)


def test_variant_by_name_and_version_by_number(server, model_repo):
    fast = infer_mlp(server, model="mlp:fast")
    expected = mlp_reference(model_repo.weights["mlp/2:fast"], X)
    np.testing.assert_allclose(fast.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    assert fast.get_response()["model_name"] == "mlp:fast"
    v1 = infer_mlp(server, model_version="1")
    expected = mlp_reference(model_repo.weights["mlp/1"], X)
    np.testing.assert_allclose(v1.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)


def test_tritonclient_metadata_config_health_and_stats(server):
    c = client(server)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("mlp") and c.is_model_ready("mlp", "1")
    assert not c.is_model_ready("broken")
    meta = c.get_model_metadata("mlp")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    config = c.get_model_config("mlp")
    assert config["max_batch_size"] == 8
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [3]}]
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    infer_mlp(server)
    stats = c.get_inference_statistics("mlp")["model_stats"]
    assert sum(s["inference_count"] for s in stats) >= 2
    names = {(r["name"], r.get("version")) for r in c.get_model_repository_index()}
    assert {("mlp", "2"), ("mlp:fast", "2"), ("broken", "1")} <= names
    with pytest.raises(InferenceServerException, match="is not in the repository"):
        c.get_model_metadata("nosuch")


def test_bytes_tensors_json_and_binary(text_server):
    strings = np.array([b"abc", "straße".encode(), b""], dtype=object)
    c = client(text_server)
    for binary in (False, True):
        item = triton.InferInput("s", [3], "BYTES")
        item.set_data_from_numpy(strings, binary_data=binary)
        outs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("upper", "length")]
        result = c.infer("text", [item], outputs=outs)
        upper = result.as_numpy("upper")
        got = [u if isinstance(u, bytes) else u.encode() for u in upper.tolist()]
        assert got == [b"ABC", "STRAßE".encode(), b""]
        np.testing.assert_array_equal(result.as_numpy("length"), [3, 7, 0])


def test_repository_load_and_unload(text_server):
    c = client(text_server)
    c.unload_model("text")
    assert not c.is_model_ready("text")
    with pytest.raises(InferenceServerException):
        c.infer("text", [_bytes_input()])
    c.load_model("text")
    assert c.is_model_ready("text")
    assert c.infer("text", [_bytes_input()]).as_numpy("length").tolist() == [1]


def _bytes_input() -> triton.InferInput:
    item = triton.InferInput("s", [1], "BYTES")
    return item.set_data_from_numpy(np.array([b"q"], dtype=object))


# -- curl -----------------------------------------------------------------------------------


def test_curl_json_request_and_headers(server, model_repo):
    body = {"id": "c1", "inputs": [{**GOOD["inputs"][0], "data": [[1, 2, 3, 4]]}]}
    status, doc = curl(
        server, "/v2/models/mlp/infer", "-d", json.dumps(body), "-H", "X-Request-ID: trace-7"
    )
    assert status == 200 and doc["id"] == "c1"
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    expected = mlp_reference(model_repo.weights["mlp/2"], x)
    np.testing.assert_allclose(doc["outputs"][0]["data"], expected.ravel(), rtol=1e-5)
    head = (
        subprocess.run(
            [
                CURL,
                "-sS",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-H",
                "X-Request-ID: trace-7",
                f"http://{server.http_url}/v2/health/ready",
            ],
            capture_output=True,
            check=True,
            timeout=30,
        )
        .stdout.decode()
        .lower()
    )
    assert "x-request-id: trace-7" in head


def _doc(**changes) -> str:
    item = {**GOOD["inputs"][0], **changes}
    return json.dumps({"inputs": [item]})


BAD = [
    ("/v2/models/mlp/infer", ["-d", "{oops"], 400, "not valid JSON"),
    ("/v2/models/mlp/infer", ["-d", _doc(name="pixels")], 400, "has no input 'pixels'"),
    ("/v2/models/mlp/infer", ["-d", _doc(datatype="FP64")], 400, "expects datatype FP32, got FP64"),
    ("/v2/models/mlp/infer", ["-d", _doc(shape=[1, 2, 2])], 400, "expects shape [-1, 4]"),
    (
        "/v2/models/mlp/infer",
        ["-d", _doc(data=[1, 2, 3])],
        400,
        "holds 4 elements but 'data' has 3",
    ),
    ("/v2/models/mlp/infer", ["-d", _doc(shape=[10**12, 4])], 400, "holds 4000000000000 elements"),
    ("/v2/models/mlp/infer", ["-d", _doc(data=["a", "b", "c", "d"])], 400, "not numbers"),
    ("/v2/models/nosuch/infer", ["-d", json.dumps(GOOD)], 404, "'nosuch' is not in the repository"),
    ("/v2/models/mlp/versions/9/infer", ["-d", json.dumps(GOOD)], 404, "version"),
    ("/v2/models/broken/infer", ["-d", json.dumps(GOOD)], 503, "broken"),
    ("/v2/models/../infer", ["-d", json.dumps(GOOD)], 400, "invalid model name '..'"),
    ("/v2/models/mlp%00/infer", ["-d", json.dumps(GOOD)], 400, "invalid model name"),
    ("/v2/models/" + "m" * 5000 + "/infer", ["-d", json.dumps(GOOD)], 400, "invalid model name"),
    (
        "/v2/models/mlp/infer",
        ["-d", json.dumps(GOOD), "-H", "Inference-Header-Content-Length: 5000"],
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "/v2/models/mlp/infer",
        ["--data-binary", "@-", "-H", "Inference-Header-Content-Length: {n}"],
        400,
        "add up to 16 bytes but only 8",
    ),
    ("/v2/nothing", [], 404, "no such endpoint"),
    ("/v2/models/mlp/infer", [], 405, "use POST"),
]


@pytest.mark.parametrize("path,args,status,message", BAD)
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(
    server, path, args, status, message
):
    stdin = None
    if "@-" in args:  # a binary request whose sizes do not add up: 16 declared, 8 sent
        header = json.dumps(
            {
                "inputs": [
                    {**GOOD["inputs"][0], "data": None, "parameters": {"binary_data_size": 16}}
                ]
            }
        )
        header = header.replace('"data": null, ', "")
        stdin = header.encode() + b"\0" * 8
        args = [a.replace("{n}", str(len(header))) for a in args]
    if stdin is None:
        code, doc = curl(server, path, *args)
    else:
        code, doc = _curl_stdin(server, path, stdin, *args)
    assert code == status, doc
    assert message in doc["error"]
    assert len(json.dumps(doc)) < 600
    assert_still_serving(server)


def _curl_stdin(server, path: str, data: bytes, *args: str) -> tuple[int, dict]:
    done = subprocess.run(
        [CURL, "-sS", "-w", "\n%{http_code}", *args, f"http://{server.http_url}{path}"],
        input=data,
        capture_output=True,
        check=True,
        timeout=30,
    )
    body, _, code = done.stdout.rpartition(b"\n")
    return int(code), json.loads(body)


# -- bodies over the limit ------------------------------------------------------------------


def _send_until_answered(port: int, head: bytes, chunk: bytes, most: int) -> tuple[int, bytes]:
    """Send `head`, then `chunk` repeatedly (up to `most` bytes) until the server answers;
    return the bytes sent after the head and everything the server sent back."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        sent = 0
        try:
            while sent < most and not select.select([sock], [], [], 0)[0]:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed the connection: read what it said
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except OSError:
            pass  # a reset after the answer (the unread body) is expected
    return sent, answer


def _status_and_error(answer: bytes) -> tuple[int, str, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    return int(lines[0].split()[1]), json.loads(body)["error"], "\n".join(lines[1:])


def test_declared_body_over_the_limit_is_refused_without_reading_it(text_server):
    declared = 1 << 30  # 1 GiB declared; the test stops sending once the answer comes
    head = (
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % declared
    )
    sent, answer = _send_until_answered(text_server.http_port, head, b" " * 65536, declared)
    status, error, headers = _status_and_error(answer)
    assert status == 413 and f"limit of {SMALL_LIMIT} bytes" in error
    assert "connection: close" in headers
    assert sent < 64 << 20  # answered long before the 1 GiB arrived
    assert_still_serving(text_server)


def test_chunked_body_over_the_limit_is_cut_off(text_server):
    head = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b" " * 65536
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sent, answer = _send_until_answered(text_server.http_port, head, chunk, 256 << 20)
    status, error, _ = _status_and_error(answer)
    assert status == 413 and "over the limit" in error
    assert sent < 64 << 20
    assert_still_serving(text_server)


def test_curl_body_over_the_limit(text_server, tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (SMALL_LIMIT + 1))
    status, doc = curl(text_server, "/v2/models/mlp/infer", "--data-binary", f"@{big}")
    assert status == 413 and "--max-body-bytes" in doc["error"]
    assert_still_serving(text_server)


def test_server_log_has_no_tracebacks(server):
    assert "Traceback" not in server.log()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_errors_do_not_reveal_where_the_repository_is(server: ServerProcess) -> None:
    """Clients see '<repository>', never the server's folder layout."""
    import urllib.error
    import urllib.request

    url = f"http://{server.http_url}/v2/models/broken"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read().decode()
    assert "UNAVAILABLE" in body and "<repository>" in body
    root = server.log_path.parent / "models"
    assert str(root) not in body


def test_health_status_reports_degraded_states(server: ServerProcess) -> None:
    import json
    import urllib.request

    url = f"http://{server.http_url}/v2/health/status"
    with urllib.request.urlopen(url, timeout=10) as resp:
        status = json.loads(resp.read())
    assert status["live"] and status["ready"]
    assert status["status"] == "degraded" and "broken/1" in status["failed_units"]
