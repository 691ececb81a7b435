"""Security end to end: API keys with scopes and TLS (and mTLS) on a real server.

The server runs with --api-keys-file, --tls-cert/--tls-key and --model-control; clients are
tritonclient (gRPC over TLS) and curl (HTTPS). Every refusal gets the right status, no key
appears in the server's log, and the server still answers correctly afterwards.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from slimserve.security.keys import KeyStore
from tests.e2e.conftest import Repo, ServerProcess, mlp_reference, start_server, stop_server
from tests.tls import Pki, make_pki


@dataclass
class Keys:
    reader: str  # infer, mlp only
    admin: str  # manage
    ops: str  # metrics
    revoked: str
    forged: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Keys]:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    store = KeyStore(path)
    _, reader = store.create("reader", ["infer"], models=["mlp"])
    _, admin = store.create("admin", ["manage", "infer"])
    _, ops = store.create("ops", ["metrics"])
    record, revoked = store.create("gone", ["infer"])
    store.revoke(record.key_id)
    forged = reader[:-4] + ("AAAA" if not reader.endswith("AAAA") else "BBBB")
    return path, Keys(reader, admin, ops, revoked, forged)


@pytest.fixture(scope="module")
def secure_server(
    model_repo: Repo, pki: Pki, keys_file: tuple[Path, Keys], tmp_path_factory
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("secure") / "models"
    shutil.copytree(model_repo.root, root)
    context = ssl.create_default_context(cafile=str(pki.ca))
    proc = start_server(
        root,
        root.parent / "server.log",
        "--model-control",
        "--api-keys-file",
        str(keys_file[0]),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--audit-log",
        str(root.parent / "audit.log"),
        ssl_context=context,
    )
    yield proc
    stop_server(proc)


def grpc_client(server: ServerProcess, pki: Pki) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        server.grpc_url, ssl=True, root_certificates=str(pki.ca)
    )


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"authorization": f"Bearer {key}"}


def infer_grpc(client, key: str | None, model: str = "mlp"):
    x = np.ones((1, 4), np.float32)
    inp = grpcclient.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], headers=bearer(key))


def grpc_status(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status()


def test_grpc_keys_and_scopes(secure_server, pki, keys_file, model_repo):
    keys = keys_file[1]
    client = grpc_client(secure_server, pki)
    assert client.is_server_live()  # health needs no key
    assert grpc_status(lambda: infer_grpc(client, None)) == "StatusCode.UNAUTHENTICATED"
    assert grpc_status(lambda: infer_grpc(client, keys.forged)) == "StatusCode.UNAUTHENTICATED"
    assert grpc_status(lambda: infer_grpc(client, keys.revoked)) == "StatusCode.UNAUTHENTICATED"
    assert grpc_status(lambda: infer_grpc(client, keys.ops)) == "StatusCode.PERMISSION_DENIED"
    assert (
        grpc_status(lambda: infer_grpc(client, keys.reader, "broken"))
        == "StatusCode.PERMISSION_DENIED"
    )
    assert (
        grpc_status(lambda: client.unload_model("mlp", headers=bearer(keys.reader)))
        == "StatusCode.PERMISSION_DENIED"
    )
    out = infer_grpc(client, keys.reader).as_numpy("logits")
    expected = mlp_reference(model_repo.weights["mlp/2"], np.ones((1, 4), np.float32))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    client.unload_model("mlp", headers=bearer(keys.admin))
    client.load_model("mlp", headers=bearer(keys.admin))
    assert infer_grpc(client, keys.reader).as_numpy("logits").shape == (1, 3)


def test_plaintext_grpc_is_refused_on_a_tls_port(secure_server):
    client = grpcclient.InferenceServerClient(secure_server.grpc_url)
    with pytest.raises(InferenceServerException):
        client.is_server_live(client_timeout=3)


def test_https_with_curl_and_keys(secure_server, pki, keys_file):
    keys = keys_file[1]
    url = f"https://127.0.0.1:{secure_server.http_port}"

    def curl(path: str, key: str | None = None, body: str | None = None) -> tuple[int, str]:
        cmd = ["curl", "-s", "--cacert", str(pki.ca), "-o", "-", "-w", "\n%{http_code}"]
        if key:
            cmd += ["-H", f"Authorization: Bearer {key}"]
        if body is not None:
            cmd += ["-d", body]
        out = subprocess.run([*cmd, url + path], capture_output=True, text=True, check=True)
        text, _, code = out.stdout.rpartition("\n")
        return int(code), text

    body = '{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,1,1,1]}]}'
    assert curl("/v2/health/ready")[0] == 200
    assert curl("/v2/models/mlp/infer", None, body)[0] == 401
    assert curl("/v2/models/mlp/infer", keys.forged, body)[0] == 401
    assert curl("/v2/models/mlp/infer", keys.ops, body)[0] == 403
    code, text = curl("/v2/models/mlp/infer", keys.reader, body)
    assert code == 200 and '"logits"' in text
    assert curl("/metrics", keys.reader)[0] == 403
    code, text = curl("/metrics", keys.ops)
    assert code == 200 and "slimserve_requests_total" in text
    assert curl("/v2/repository/models/mlp/unload", keys.reader, "{}")[0] == 403


def test_no_key_reaches_the_log_and_management_is_audited(secure_server, pki, keys_file):
    keys = keys_file[1]
    client = grpc_client(secure_server, pki)
    client.unload_model("mlp", headers=bearer(keys.admin))
    client.load_model("mlp", headers=bearer(keys.admin))
    with pytest.raises(InferenceServerException):
        client.unload_model("mlp", headers=bearer(keys.reader))
    log = secure_server.log()
    for key in (keys.reader, keys.admin, keys.ops, keys.revoked, keys.forged):
        secret = key[len("ssk_") + 13 :]  # ssk_<12 hex id>_<43-character secret>
        assert len(secret) == 43 and secret not in log
    audit = (secure_server.log_path.parent / "audit.log").read_text()
    assert '"action":"unload"' in audit and '"action":"load"' in audit and "admin" in audit
    assert '"outcome":"permission_denied"' in audit
    for key in (keys.reader, keys.admin):
        assert key[len("ssk_") + 13 :] not in audit


def test_mtls_requires_a_client_certificate(model_repo, pki, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(model_repo.root, root)
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    proc = start_server(
        root,
        tmp_path / "server.log",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca),
        "--load-models",
        "mlp",
        ssl_context=context,
    )
    try:
        without = grpcclient.InferenceServerClient(
            proc.grpc_url, ssl=True, root_certificates=str(pki.ca)
        )
        with pytest.raises(InferenceServerException):
            without.is_server_live(client_timeout=3)
        with_cert = grpcclient.InferenceServerClient(
            proc.grpc_url,
            ssl=True,
            root_certificates=str(pki.ca),
            private_key=str(pki.client_key),
            certificate_chain=str(pki.client_cert),
        )
        assert with_cert.is_server_live()
        assert infer_grpc(with_cert, None).as_numpy("logits").shape == (1, 3)
        url = f"https://127.0.0.1:{proc.http_port}/v2/health/live"
        no_cert = subprocess.run(
            ["curl", "-s", "--cacert", str(pki.ca), url], capture_output=True, text=True
        )
        assert no_cert.returncode != 0  # the TLS handshake is refused
    finally:
        stop_server(proc)
