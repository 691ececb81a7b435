"""Limits and hostile requests against a real `slimserve serve` process, over HTTP and gRPC.

One server runs with small limits (1 s header deadline, 2 s body deadline, 4 KiB of headers,
64 tensor elements, 16-byte strings, 64 KiB bodies), model control and a data key, on a copy
of the test repository plus hostile models: one whose folder is a symlink out of the
repository, one whose artifact was changed after its manifest was written, one encrypted with
another key, and one encrypted with the right key. Each hostile request is refused with the
right status and a message naming the limit or the reason; no file outside the repository
and no key reaches a response; and after each one the server still answers correctly.
"""

from __future__ import annotations

import json
import select
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from slimserve.security.crypto import encrypt_unit, generate_data_key
from tests.e2e.conftest import Repo, ServerProcess, mlp_reference, start_server, stop_server

pytestmark = pytest.mark.timeout(120)

X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
GOOD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
LIMITS = {
    "--header-timeout-s": "1",
    "--body-timeout-s": "2",
    "--max-header-bytes": "4096",
    "--max-tensor-elements": "64",
    "--max-string-bytes": "16",
    "--max-body-bytes": "65536",
}
SECRET_MARK = "outside-the-repository"  # the name of the folder the symlink points to


@pytest.fixture(scope="module")
def hostile(model_repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("limits")
    root = work / "models"
    shutil.copytree(model_repo.root, root, ignore=shutil.ignore_patterns("broken"))
    outside = work / SECRET_MARK / "escape"
    shutil.copytree(root / "mlp", outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    _copy_version(root, "tampered")
    onnx_file = root / "tampered" / "1" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\x00")  # after the manifest
    key, other = generate_data_key(), generate_data_key()
    _copy_version(root, "wrongkey")
    encrypt_unit(root / "wrongkey" / "1", other)
    _copy_version(root, "secret")
    encrypt_unit(root / "secret" / "1", key)
    (work / "data.key").write_bytes(key)
    (work / "data.key").chmod(0o600)
    flags = [x for pair in LIMITS.items() for x in pair]
    server = start_server(
        root,
        work / "server.log",
        "--model-control",
        "--data-key-file",
        str(work / "data.key"),
        *flags,
    )
    yield server
    stop_server(server)
    assert server.process.returncode == 0, server.log()
    assert key.hex() not in server.log()


def _copy_version(root: Path, name: str) -> None:
    (root / name / "1").mkdir(parents=True)
    shutil.copy(root / "mlp" / "model.yaml", root / name / "model.yaml")
    for item in (root / "mlp" / "1").iterdir():
        shutil.copy(item, root / name / "1" / item.name)


# -- clients -------------------------------------------------------------------------------


def http(server: ServerProcess, method: str, path: str, body: object = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{server.http_url}{path}",
        data=data,
        method=method,
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def raw_request(server: ServerProcess, payload: bytes, timeout: float = 10) -> bytes:
    """Send `payload` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=timeout) as sock:
        sock.sendall(payload)
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def assert_serving(server: ServerProcess, repo: Repo) -> None:
    """The server is alive and still computes the right answer on both transports."""
    assert server.alive()
    status, doc = http(server, "POST", "/v2/models/mlp/infer", GOOD)
    assert status == 200, doc
    expected = mlp_reference(repo.weights["mlp/2"], X)
    np.testing.assert_allclose(doc["outputs"][0]["data"], expected.reshape(-1), rtol=1e-5)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    out = client.infer("mlp", [inp]).as_numpy("logits")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    client.close()


def grpc_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


# -- path traversal ------------------------------------------------------------------------

TRAVERSALS = ["..%2F..%2Fetc%2Fpasswd", "%2e%2e", "..", "%2Fetc%2Fpasswd", "mlp%00", "a%5C..%5Cb"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_traversal_in_model_names_over_http(hostile, model_repo, name):
    for method, path in (
        ("GET", f"/v2/models/{name}"),
        ("GET", f"/v2/models/{name}/ready"),
        ("POST", f"/v2/models/{name}/infer"),
        ("POST", f"/v2/repository/models/{name}/load"),
        ("POST", f"/v2/repository/models/{name}/unload"),
    ):
        status, doc = http(hostile, method, path, GOOD if method == "POST" else None)
        assert status in (400, 404), (path, status, doc)
        assert "root:" not in json.dumps(doc)
        if status == 400:
            assert "invalid model name" in doc["error"]
    assert_serving(hostile, model_repo)


@pytest.mark.parametrize("name", ["../mlp", "../../etc/passwd", "/etc/passwd", "mlp\x00", ".."])
def test_traversal_in_load_requests_over_grpc(hostile, model_repo, name):
    client = grpcclient.InferenceServerClient(hostile.grpc_url)
    for call in (
        lambda: client.load_model(name),
        lambda: client.unload_model(name),
        lambda: client.get_model_metadata(name),
    ):
        error = grpc_error(call)
        assert error.status() == "StatusCode.INVALID_ARGUMENT", error.message()
        assert "invalid model name" in error.message()
    client.close()
    assert_serving(hostile, model_repo)


def test_symlink_escape_is_refused(hostile, model_repo):
    """'escape' is a symlink to a valid model outside the repository: never loaded."""
    status, doc = http(hostile, "POST", "/v2/repository/models/escape/load")
    assert status == 400 and "resolves outside the repository" in doc["error"], doc
    assert SECRET_MARK not in doc["error"]  # where it points is not told
    status, doc = http(hostile, "POST", "/v2/models/escape/infer", GOOD)
    assert status == 503, doc
    client = grpcclient.InferenceServerClient(hostile.grpc_url)
    error = grpc_error(lambda: client.load_model("escape"))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "resolves outside the repository" in error.message()
    client.close()
    assert_serving(hostile, model_repo)


# -- tampered and wrongly keyed artifacts --------------------------------------------------


@pytest.mark.parametrize(
    ("model", "reason"),
    [("tampered", "model.onnx"), ("wrongkey", "wrong key or the file was modified")],
)
def test_bad_artifacts_are_refused_with_a_reason(hostile, model_repo, model, reason):
    status, doc = http(hostile, "GET", f"/v2/models/{model}")
    assert status == 200 and doc["state"] != "READY", doc
    assert reason in doc["reason"], doc
    status, doc = http(hostile, "POST", f"/v2/models/{model}/infer", GOOD)
    assert status in (400, 503), doc
    status, doc = http(hostile, "POST", f"/v2/repository/models/{model}/load")
    assert status == 400 and reason in doc["error"], doc
    client = grpcclient.InferenceServerClient(hostile.grpc_url)
    error = grpc_error(lambda: client.load_model(model))
    assert error.status() == "StatusCode.FAILED_PRECONDITION" and reason in error.message()
    client.close()
    assert_serving(hostile, model_repo)


def test_encrypted_model_with_the_right_key_serves(hostile, model_repo):
    status, doc = http(hostile, "POST", "/v2/models/secret/infer", GOOD)
    assert status == 200, doc
    expected = mlp_reference(model_repo.weights["mlp/1"], X)
    np.testing.assert_allclose(doc["outputs"][0]["data"], expected.reshape(-1), rtol=1e-5)


# -- size limits ---------------------------------------------------------------------------


def test_too_many_tensor_elements(hostile, model_repo):
    big = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [17, 4], "data": [0] * 68}]}
    status, doc = http(hostile, "POST", "/v2/models/mlp/infer", big)
    assert status == 400 and "--max-tensor-elements" in doc["error"], doc
    zero = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 10**12], "data": []}]}
    status, doc = http(hostile, "POST", "/v2/models/mlp/infer", zero)
    assert status == 400 and "--max-tensor-elements" in doc["error"], doc
    client = grpcclient.InferenceServerClient(hostile.grpc_url)
    inp = grpcclient.InferInput("input", [17, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((17, 4), np.float32))
    error = grpc_error(lambda: client.infer("mlp", [inp]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "--max-tensor-elements" in error.message()
    client.close()
    assert_serving(hostile, model_repo)


def test_too_long_strings(hostile, model_repo):
    text = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "data": ["ok", "x" * 17]}]}
    status, doc = http(hostile, "POST", "/v2/models/mlp/infer", text)
    assert status == 400 and "--max-string-bytes" in doc["error"], doc
    client = grpcclient.InferenceServerClient(hostile.grpc_url)
    inp = grpcclient.InferInput("s", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"y" * 17], dtype=object))
    error = grpc_error(lambda: client.infer("mlp", [inp]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "--max-string-bytes" in error.message()
    client.close()
    assert_serving(hostile, model_repo)


def test_oversized_body_and_headers(hostile, model_repo):
    body = b"[" + b"0," * 40000 + b"0]"
    head = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    reply = raw_request(hostile, head % len(body))  # refused before the body is sent
    assert status_of(reply) == 413 and b"--max-body-bytes" in reply
    padding = b"X-Pad: " + b"a" * 5000 + b"\r\n"
    reply = raw_request(hostile, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + padding + b"\r\n")
    assert status_of(reply) == 431 and b"--max-header-bytes" in reply
    client = grpcclient.InferenceServerClient(hostile.grpc_url)
    error = grpc_error(lambda: client.is_server_live(headers={"x-pad": "a" * 20000}))
    assert error.status() in ("StatusCode.RESOURCE_EXHAUSTED", "StatusCode.INTERNAL")
    client.close()
    assert_serving(hostile, model_repo)


def test_endless_header_is_cut_off(hostile, model_repo):
    """A header that never ends is refused once the 4 KiB cap is passed (431, or a reset if
    the client is still sending when the server closes), long before 4 MiB are sent."""
    total, sent = 4 << 20, 0
    with socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            while sent < total:
                sock.sendall(b"a" * 4096)
                sent += 4096
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _read_all(sock)
    assert sent < total, "the endless header was never cut off"
    if reply:  # (the client may see a reset first, the kernel having buffered what it sent)
        assert status_of(reply) == 431 and b"--max-header-bytes" in reply
        counted = int(reply.split(b"headers have ", 1)[1].split(b" ", 1)[0])
        assert counted <= 4096 + 256 * 1024  # the cap plus at most one read (uvloop: 256 KiB)
    assert_serving(hostile, model_repo)


# -- slow and idle connections -------------------------------------------------------------


def test_slowloris_headers_are_cut_off_while_others_are_served(hostile, model_repo):
    """A client trickling header bytes (one per 0.1 s) is answered 408 and closed once the
    1 s header deadline passes; normal requests are served meanwhile."""
    with socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10) as slow:
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Slow: ")
        sent = 0
        while sent < 100 and not select.select([slow], [], [], 0.1)[0]:
            try:
                slow.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            if sent == 3:
                assert_serving(hostile, model_repo)
        reply = _read_all(slow)
    assert sent < 100, "the slow client was never cut off"
    assert status_of(reply) == 408 and b"--header-timeout-s" in reply
    assert_serving(hostile, model_repo)


def test_idle_connection_is_closed(hostile, model_repo):
    with socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10) as idle:
        reply = _read_all(idle)  # returns when the server closes it, after ~1 s
    assert status_of(reply) == 408
    assert_serving(hostile, model_repo)


def test_slow_body_is_cut_off(hostile, model_repo):
    body = json.dumps(GOOD).encode()
    with socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10) as slow:
        slow.sendall(
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10]
        )
        reply = _read_all(slow)  # nothing more is sent: the 2 s body deadline ends it
    assert status_of(reply) == 408 and b"--body-timeout-s" in reply
    assert_serving(hostile, model_repo)


def test_keep_alive_requests_still_work(hostile):
    """Deadlines are per request: three requests on one connection, spaced under the header
    deadline, all succeed."""
    with socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10) as sock:
        for _ in range(3):
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b'{"live":true}'):
                chunk = sock.recv(65536)
                assert chunk, f"the server closed a kept-alive connection after {reply!r}"
                reply += chunk
            assert status_of(reply) == 200
            time.sleep(0.5)


def test_non_ascii_digit_header_length_is_a_400(hostile, model_repo):
    """Found by tests/transport/test_fuzz_codecs.py: '²' passed str.isdigit and then failed
    int(), a 500; it is a 400 now."""
    body = json.dumps(GOOD).encode()
    reply = raw_request(
        hostile,
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Inference-Header-Content-Length: \xb2\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
    )
    assert status_of(reply) == 400 and b"is not a byte count" in reply
    assert_serving(hostile, model_repo)


def test_grpc_slow_handshake_is_cut_off(hostile, model_repo):
    """A client trickling the HTTP/2 preface to the gRPC port (one byte per 0.3 s: 7 s in
    all) is disconnected once the handshake deadline (--header-timeout-s, 1 s) passes; with
    gRPC's default (120 s) it would finish the preface."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    with socket.create_connection(("127.0.0.1", hostile.grpc_port), timeout=10) as slow:
        slow.recv(1024)  # the server's SETTINGS frame, sent at once
        sent, closed = 0, False
        while sent < len(preface) and not closed:
            if select.select([slow], [], [], 0.3)[0]:
                _read_all(slow)  # readable again only as it closes (GOAWAY, then EOF)
                closed = True
                continue
            try:
                slow.send(preface[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            sent += 1
    assert closed and sent < len(preface), "the slow gRPC client was never cut off"
    assert_serving(hostile, model_repo)
