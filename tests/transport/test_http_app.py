"""The v2 HTTP app in process (httpx.ASGITransport, or raw ASGI messages where the test must
see what the app reads) over the real Engine and a repository folder with small in-test
runtimes: routes, inference in JSON and binary, variants and versions, errors and limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from slimserve.app import build_engine
from slimserve.config import Settings
from slimserve.errors import Unavailable
from slimserve.repository import Repository
from slimserve.repository.store import Target
from slimserve.runtimes.base import Runtime, RuntimeOptions
from slimserve.security.keys import KeyStore
from slimserve.transport.asgi import create_app
from slimserve.transport.http import STATUS, _error_reply
from slimserve.types import ModelSettings

pytestmark = pytest.mark.timeout(60)

CALC_YAML = """\
backend: python
inputs:  [{name: x, datatype: FP32, shape: [-1, 3]}]
outputs:
  - {name: scaled, datatype: FP32, shape: [-1, 3]}
  - {name: total, datatype: FP32, shape: [-1]}
batching: {max_batch_size: 8, max_queue_delay_ms: 1}
"""
TEXT_YAML = """\
backend: python
inputs:  [{name: s, datatype: BYTES, shape: [-1]}]
outputs: [{name: upper, datatype: BYTES, shape: [-1]}, {name: length, datatype: INT32, shape: [-1]}]
batching: {max_batch_size: 8, max_queue_delay_ms: 1}
"""
SLOW_YAML = CALC_YAML.replace("max_batch_size: 8", "max_batch_size: 1")


class CalcRuntime(Runtime):
    """scaled = x * factor (factor.txt in the artifact folder), total = row sums of x.
    factor.txt 'slow' sleeps 0.5 s when x[0, 0] = 7; 'crash' raises a plain RuntimeError when
    x[0, 0] = 13 (other inputs pass, so the engine's warm-up at load is quick and succeeds)."""

    def load(self) -> None:
        self.text = (self.target.path / "factor.txt").read_text()
        self.factor = 1.0 if self.text in ("slow", "crash") else float(self.text)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.text == "slow" and inputs["x"][0, 0] == 7:
            time.sleep(0.5)
        if self.text == "crash" and inputs["x"][0, 0] == 13:
            raise RuntimeError("kaboom")
        x = inputs["x"]
        return {"scaled": x * np.float32(self.factor), "total": x.sum(axis=1)}

    def unload(self) -> None:
        pass

    def memory_bytes(self) -> int:
        return 64


class TextRuntime(CalcRuntime):
    def load(self) -> None:
        pass

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = inputs["s"]
        upper = np.array([b.upper() for b in s], dtype=object)
        return {"upper": upper, "length": np.array([len(b) for b in s], dtype=np.int32)}


def factory(target: Target, options: RuntimeOptions) -> Runtime:
    cls = TextRuntime if target.model == "text" else CalcRuntime
    return cls(target, options)


def _model(root: Path, name: str, yaml: str, versions: dict[str, str]) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "model.yaml").write_text(yaml)
    for folder, factor in versions.items():
        (root / name / folder).mkdir(parents=True)
        (root / name / folder / "factor.txt").write_text(factor)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("http-app") / "models"
    _model(root, "calc", CALC_YAML, {"1": "1", "2": "2", "2/variants/half": "0.5"})
    _model(root, "text", TEXT_YAML, {"1": "-"})
    _model(root, "slow", SLOW_YAML, {"1": "slow"})
    _model(root, "crash", CALC_YAML, {"1": "crash"})
    return root


@contextlib.asynccontextmanager
async def serving(root: Path, **options: Any):
    settings = Settings(repository=root, model_control=True, **options)
    engine = build_engine(settings, repository=Repository(root), runtime_factory=factory)
    await engine.start(wait=True)
    app = create_app(engine, settings)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, app
    finally:
        await engine.stop()


def run(root: Path, body, **options: Any) -> Any:
    async def main():
        async with serving(root, **options) as (client, app):
            return await body(client, app)

    return asyncio.run(main())


def x_input(rows: list[list[float]], **extra: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [len(rows), 3], "data": rows, **extra}


X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
GOOD = orjson.dumps({"inputs": [x_input(X)]})


def outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    length = response.headers.get("inference-header-content-length")
    result = triton.InferResult.from_response_body(
        response.content, header_length=int(length) if length else None
    )
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


# -- health, metadata, routes ---------------------------------------------------------------


def test_health_server_metadata_and_unknown_routes(repo):
    async def body(client, app):
        live, ready = await client.get("/v2/health/live"), await client.get("/v2/health/ready")
        assert (live.status_code, live.json()) == (200, {"live": True})
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        meta = (await client.get("/v2")).json()
        assert meta["name"] == "slimserve" and "binary_tensor_data" in meta["extensions"]
        missing = await client.get("/v1/nothing")
        assert missing.status_code == 404 and "/v2" in missing.json()["error"]
        assert (await client.get("/v2/health/sleepy")).status_code == 404
        wrong = await client.post("/v2/health/live")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
        assert "use GET" in wrong.json()["error"]
        infer_get = await client.get("/v2/models/calc/infer")
        assert infer_get.status_code == 405 and infer_get.headers["allow"] == "POST"

    run(repo, body)


def test_model_metadata_config_ready_and_stats(repo):
    async def body(client, app):
        meta = (await client.get("/v2/models/calc")).json()
        assert meta["name"] == "calc" and meta["versions"] == ["1", "2"]
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
        assert [o["name"] for o in meta["outputs"]] == ["scaled", "total"]
        assert (await client.get("/v2/models/calc/versions/1/")).json()["name"] == "calc"
        config = (await client.get("/v2/models/calc/config")).json()
        assert config["max_batch_size"] == 8
        assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [3]}]
        for path in ("/v2/models/calc/ready", "/v2/models/calc/versions/1/ready"):
            ready = await client.get(path)
            assert (ready.status_code, ready.json()) == (200, {"name": "calc", "ready": True})
        assert (await client.get("/v2/models/calc:half/ready")).status_code == 200
        await client.post("/v2/models/calc/infer", content=GOOD)
        stats = (await client.get("/v2/models/calc/stats")).json()["model_stats"]
        assert sum(s["inference_count"] for s in stats) == 2
        every = (await client.get("/v2/models/stats")).json()["model_stats"]
        assert {s["name"] for s in every} >= {"calc", "calc:half", "text"}
        for path, status, text in [
            ("/v2/models/nosuch", 404, "nosuch"),
            ("/v2/models/calc/versions/7", 404, "version 7"),
            ("/v2/models/calc/versions/x1/ready", 400, "not a positive integer"),
            ("/v2/models/calc/versions", 404, "no such endpoint"),
            ("/v2/models/calc/pose", 404, "no such endpoint"),
        ]:
            answer = await client.get(path)
            assert answer.status_code == status, path
            assert text in answer.json()["error"]

    run(repo, body)


# -- inference ------------------------------------------------------------------------------


def test_json_inference_flat_and_nested_with_ids(repo):
    async def body(client, app):
        flat = x_input([[v for row in X for v in row]])
        flat["shape"] = [2, 3]
        for item in (x_input(X), flat):
            doc = {"id": "req-1", "inputs": [item]}
            answer = await client.post(
                "/v2/models/calc/infer", content=orjson.dumps(doc), headers={"X-Request-ID": "h-9"}
            )
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == "application/json"
            assert answer.headers["x-request-id"] == "h-9"
            doc = answer.json()
            assert doc["id"] == "req-1" and doc["model_name"] == "calc"
            assert doc["model_version"] == "2"
            scaled = doc["outputs"][0]
            assert scaled == {
                "name": "scaled",
                "datatype": "FP32",
                "shape": [2, 3],
                "data": [2.0, 4.0, 6.0, 8.0, 10.0, 12.0],
            }
            assert doc["outputs"][1]["data"] == [6.0, 15.0]

    run(repo, body)


def test_versions_and_variants_by_url_and_parameter(repo):
    async def first(client, path, **doc):
        answer = await client.post(path, content=orjson.dumps({"inputs": [x_input(X)], **doc}))
        return answer.status_code, answer.json()

    async def body(client, app):
        _, v1 = await first(client, "/v2/models/calc/versions/1/infer")
        assert v1["model_version"] == "1" and v1["outputs"][0]["data"][:3] == [1.0, 2.0, 3.0]
        _, half = await first(client, "/v2/models/calc:half/infer")
        assert half["model_name"] == "calc:half"
        assert half["outputs"][0]["data"][:3] == [0.5, 1.0, 1.5]
        _, by_param = await first(client, "/v2/models/calc/infer", parameters={"variant": "half"})
        assert by_param["outputs"][0]["data"][:3] == [0.5, 1.0, 1.5]
        status, clash = await first(
            client, "/v2/models/calc:half/infer", parameters={"variant": "other"}
        )
        assert status == 400 and "variant given twice" in clash["error"]
        status, missing = await first(client, "/v2/models/calc:quarter/infer")
        assert status == 404 and "quarter" in missing["error"]

    run(repo, body)


def test_requested_outputs_and_binary_outputs(repo):
    async def infer(client, **doc):
        answer = await client.post(
            "/v2/models/calc/infer", content=orjson.dumps({"inputs": [x_input(X)], **doc})
        )
        assert answer.status_code == 200, answer.text
        return answer

    async def body(client, app):
        only_total = await infer(client, outputs=[{"name": "total"}])
        assert [o["name"] for o in only_total.json()["outputs"]] == ["total"]
        binary = await infer(
            client, outputs=[{"name": "total", "parameters": {"binary_data": True}}]
        )
        assert binary.headers["content-type"] == "application/octet-stream"
        length = int(binary.headers["inference-header-content-length"])
        header = orjson.loads(binary.content[:length])
        assert header["outputs"] == [
            {
                "name": "total",
                "datatype": "FP32",
                "shape": [2],
                "parameters": {"binary_data_size": 8},
            }
        ]
        np.testing.assert_array_equal(outputs(binary)["total"], [6.0, 15.0])
        everything = await infer(client, parameters={"binary_data_output": True})
        got = outputs(everything)
        np.testing.assert_array_equal(got["scaled"], np.array(X, np.float32) * 2)
        np.testing.assert_array_equal(got["total"], [6.0, 15.0])
        mixed = await infer(
            client,
            parameters={"binary_data_output": True},
            outputs=[{"name": "scaled", "parameters": {"binary_data": False}}, {"name": "total"}],
        )
        header = orjson.loads(
            mixed.content[: int(mixed.headers["inference-header-content-length"])]
        )
        assert "data" in header["outputs"][0] and "parameters" in header["outputs"][1]
        unknown = await client.post(
            "/v2/models/calc/infer",
            content=orjson.dumps({"inputs": [x_input(X)], "outputs": [{"name": "nope"}]}),
        )
        assert unknown.status_code == 400 and "no output 'nope'" in unknown.json()["error"]

    run(repo, body)


def _triton_request(name: str, array: np.ndarray, datatype: str, binary: bool = True):
    item = triton.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array, binary_data=binary)
    out = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("scaled", "total")]
    outs = out if name == "x" else None
    body, length = triton.InferenceServerClient.generate_request_body([item], outputs=outs)
    headers = {"Content-Type": "application/octet-stream"}
    if length is not None:
        headers["Inference-Header-Content-Length"] = str(length)
    return body, headers


def test_binary_request_from_tritonclient(repo):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)

    async def body(client, app):
        content, headers = _triton_request("x", x, "FP32")
        answer = await client.post("/v2/models/calc/infer", content=content, headers=headers)
        assert answer.status_code == 200, answer.text
        got = outputs(answer)
        np.testing.assert_array_equal(got["scaled"], x * 2)
        np.testing.assert_array_equal(got["total"], x.sum(axis=1))

    run(repo, body)


def test_bytes_tensors_in_json_and_binary(repo):
    strings = np.array([b"abc", "ünï".encode(), b""], dtype=object)

    async def body(client, app):
        doc = {
            "inputs": [{"name": "s", "datatype": "BYTES", "shape": [3], "data": ["abc", "ünï", ""]}]
        }
        answer = await client.post("/v2/models/text/infer", content=orjson.dumps(doc))
        assert answer.status_code == 200, answer.text
        out = answer.json()["outputs"]
        assert out[0] == {
            "name": "upper",
            "datatype": "BYTES",
            "shape": [3],
            "data": ["ABC", "üNï", ""],
        }
        assert out[1]["data"] == [3, 5, 0]
        content, headers = _triton_request("s", strings, "BYTES")
        answer = await client.post("/v2/models/text/infer", content=content, headers=headers)
        assert answer.status_code == 200, answer.text
        got = outputs(answer)
        assert got["upper"].tolist() == [b"ABC", "üNï".encode(), b""]
        np.testing.assert_array_equal(got["length"], [3, 5, 0])

    run(repo, body)


def test_timeout_parameter_reaches_the_engine(repo):
    async def body(client, app):
        statuses = {}
        for timeout in (0, "soon", 30_000_000, 30.0):
            doc = {"inputs": [x_input(X)], "parameters": {"timeout": timeout}}
            answer = await client.post("/v2/models/calc/infer", content=orjson.dumps(doc))
            statuses[timeout] = (answer.status_code, answer.json().get("error", ""))
        assert statuses[0][0] == 504 and "timeout" in statuses[0][1]
        assert statuses["soon"][0] == 400 and "'timeout'" in statuses["soon"][1]
        assert statuses[30_000_000][0] == 200  # an integer is microseconds, as Triton's
        assert statuses[30.0][0] == 200  # a float is seconds

    run(repo, body)


def test_full_queue_answers_503_with_retry_after(repo):
    async def body(client, app):
        async def call():
            return await client.post("/v2/models/slow/infer", content=SLOW_ROW)

        answers = await asyncio.gather(*(call() for _ in range(4)))
        refused = [a for a in answers if a.status_code == 503]
        assert refused, [a.status_code for a in answers]
        assert refused[0].headers["retry-after"] == "1"
        assert "queue is full" in refused[0].json()["error"]
        assert (await call()).status_code == 200

    run(repo, body, max_queue_size=1)


SLOW_ROW = orjson.dumps({"inputs": [x_input([[7.0, 0.0, 0.0]])]})


def test_error_table_and_retry_after_header():
    status, body, headers = _error_reply(Unavailable("busy", retry_after_s=1.2))
    assert status == 503 and orjson.loads(body) == {"error": "busy"}
    assert (b"retry-after", b"2") in headers
    assert len(STATUS) == 12 and set(STATUS.values()) >= {400, 404, 413, 429, 501, 503, 504}


# -- bad input ------------------------------------------------------------------------------

_BINARY_HEADER = orjson.dumps(
    {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1, 3],
                "parameters": {"binary_data_size": 12},
            }
        ]
    }
)

BAD_REQUESTS = [
    ("calc", b"{not json", {}, 400, "not valid JSON"),
    ("calc", b"", {}, 400, "empty"),
    ("calc", orjson.dumps({"inputs": [{**x_input(X), "name": "y"}]}), {}, 400, "no input 'y'"),
    (
        "calc",
        orjson.dumps({"inputs": [{**x_input(X), "datatype": "INT32", "data": [[1, 2, 3]] * 2}]}),
        {},
        400,
        "expects datatype FP32, got INT32",
    ),
    (
        "calc",
        orjson.dumps({"inputs": [{**x_input(X), "shape": [3, 2]}]}),
        {},
        400,
        "expects shape [-1, 3]",
    ),
    (
        "calc",
        orjson.dumps({"inputs": [{**x_input(X), "shape": [2, 4]}]}),
        {},
        400,
        "holds 8 elements but 'data' has 6",
    ),
    (
        "calc",
        orjson.dumps({"inputs": [{**x_input(X), "shape": [10**9, 10**9, 3]}]}),
        {},
        400,
        "'data' has 6",
    ),
    ("calc", orjson.dumps({"inputs": [x_input([[1, 2, 3]] * 9)]}), {}, 400, "max_batch_size is 8"),
    (
        "calc",
        _BINARY_HEADER + b"\0" * 8,
        {"Inference-Header-Content-Length": str(len(_BINARY_HEADER))},
        400,
        "only 8 bytes follow",
    ),
    (
        "calc",
        _BINARY_HEADER + b"\0" * 16,
        {"Inference-Header-Content-Length": str(len(_BINARY_HEADER))},
        400,
        "16 bytes follow",
    ),
    (
        "calc",
        GOOD,
        {"Inference-Header-Content-Length": "99999"},
        400,
        "Inference-Header-Content-Length",
    ),
    ("calc", _BINARY_HEADER + b"\0" * 12, {}, 400, "not valid JSON"),
    ("nosuch", GOOD, {}, 404, "'nosuch' is not in the repository"),
    ("calc", GOOD, {"Content-Encoding": "gzip"}, 501, "Content-Encoding 'gzip' is not supported"),
    (
        "crash",
        orjson.dumps({"inputs": [x_input([[13, 0, 0]])]}),
        {},
        500,
        "inference failed: RuntimeError: kaboom",
    ),
]


@pytest.mark.parametrize("model,content,headers,status,message", BAD_REQUESTS)
def test_bad_requests_get_a_json_4xx_and_the_next_request_succeeds(
    repo, model, content, headers, status, message
):
    async def body(client, app):
        answer = await client.post(f"/v2/models/{model}/infer", content=content, headers=headers)
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert message in answer.json()["error"]
        good = await client.post("/v2/models/calc/infer", content=GOOD)
        assert good.status_code == 200

    run(repo, body)


# -- raw ASGI: paths as sent, and what the app reads ----------------------------------------


class Exchange:
    """Drives the app with hand-made ASGI messages and records what it sends back."""

    def __init__(self, app, chunks: list[bytes] | None = None, forever: bytes | None = None):
        self.app, self.chunks, self.forever = app, list(chunks or []), forever
        self.reads = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        if self.forever is not None:
            return {"type": "http.request", "body": self.forever, "more_body": True}
        body = self.chunks.pop(0) if self.chunks else b""
        return {"type": "http.request", "body": body, "more_body": bool(self.chunks)}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def request(self, method: str, raw_path: bytes, headers=()) -> tuple[int, dict, Any]:
        scope = {
            "type": "http",
            "method": method,
            "path": raw_path.decode("latin-1"),
            "raw_path": raw_path,
            "query_string": b"",
            "headers": [(k.lower(), v) for k, v in headers],
        }
        await self.app(scope, self.receive, self.send)
        start, body = self.sent
        assert start["type"] == "http.response.start" and body["type"] == "http.response.body"
        assert not body.get("more_body", False)  # one body message per response
        hdrs = dict(start["headers"])
        assert int(hdrs[b"content-length"]) == len(body["body"])
        return start["status"], hdrs, orjson.loads(body["body"])


@pytest.mark.parametrize(
    "raw_path,status,message",
    [
        (b"/v2/models/../infer", 400, "invalid model name '..'"),
        (b"/v2/models/%2e%2e/infer", 400, "invalid model name '..'"),
        (b"/v2/models/calc%00/infer", 400, "invalid model name 'calc\\x00'"),
        (b"/v2/models/a%2Fb/infer", 400, "invalid model name 'a/b'"),
        (b"/v2/models/" + b"m" * 5000 + b"/infer", 400, "invalid model name 'mmmm"),
        (b"/v2/models/calc:/infer", 400, "invalid variant name"),
    ],
)
def test_hostile_model_names(repo, raw_path, status, message):
    async def body(client, app):
        exchange = Exchange(app, [GOOD])
        got, _, doc = await exchange.request("POST", raw_path)
        assert got == status and message in doc["error"]
        assert len(doc["error"]) < 400  # a 5,000-character name is not echoed whole
        assert (await client.post("/v2/models/calc/infer", content=GOOD)).status_code == 200

    run(repo, body)


def test_declared_body_over_the_limit_is_refused_before_reading(repo):
    async def body(client, app):
        exchange = Exchange(app, [b"x" * 100])
        status, headers, doc = await exchange.request(
            "POST", b"/v2/models/calc/infer", [(b"content-length", b"2000000")]
        )
        assert status == 413 and exchange.reads == 0
        assert headers[b"connection"] == b"close"
        assert "over the limit of 1048576 bytes" in doc["error"]
        assert (await client.post("/v2/models/calc/infer", content=GOOD)).status_code == 200

    run(repo, body, max_body_bytes=1 << 20)


def test_streamed_body_stops_being_read_past_the_limit(repo):
    async def body(client, app):
        exchange = Exchange(app, forever=b"x" * (256 << 10))  # chunked, never ends
        status, headers, doc = await exchange.request(
            "POST", b"/v2/models/calc/infer", [(b"transfer-encoding", b"chunked")]
        )
        assert status == 413 and headers[b"connection"] == b"close"
        assert exchange.reads == 5  # 5 x 256 KiB is the first read past 1 MiB
        assert "over the limit" in doc["error"]

    run(repo, body, max_body_bytes=1 << 20)


def test_body_in_many_chunks_is_joined(repo):
    async def body(client, app):
        chunks = [GOOD[i : i + 7] for i in range(0, len(GOOD), 7)]
        exchange = Exchange(app, chunks)
        status, _, doc = await exchange.request("POST", b"/v2/models/calc/infer")
        assert status == 200 and doc["outputs"][1]["data"] == [6.0, 15.0]
        assert exchange.reads == len(chunks)

    run(repo, body)


def test_lifespan_is_acknowledged(repo):
    async def body(client, app):
        inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent: list[dict[str, Any]] = []

        async def receive():
            return inbox.pop(0)

        async def send(message):
            sent.append(message)

        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        assert [m["type"] for m in sent] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]

    run(repo, body)


# -- repository extension -------------------------------------------------------------------


def test_repository_index_load_and_unload(repo):
    async def body(client, app):
        index = (await client.post("/v2/repository/index")).json()
        rows = {(r["name"], r["version"]): r["state"] for r in index}
        assert rows[("calc", "2")] == "READY" and rows[("calc:half", "2")] == "READY"
        ready_only = await client.post("/v2/repository/index", content=b'{"ready": true}')
        assert all(r["state"] == "READY" for r in ready_only.json())
        unload = await client.post("/v2/repository/models/text/unload")
        assert unload.status_code == 200, unload.text
        ready = await client.get("/v2/models/text/ready")
        assert (ready.status_code, ready.json()["ready"]) == (503, False)
        load = await client.post("/v2/repository/models/text/load", content=b"{}")
        assert load.status_code == 200, load.text
        assert (await client.get("/v2/models/text/ready")).status_code == 200
        for path, content, status, text in [
            ("/v2/repository/models/nosuch/load", b"", 404, "nosuch"),
            ("/v2/repository/models/calc:half/load", b"", 400, "load a model by its name"),
            ("/v2/repository/models/calc/load", b'{"parameters": {"config": "{}"}}', 501, "config"),
            ("/v2/repository/models/calc/load", b"[1]", 400, "JSON object"),
            ("/v2/repository/index", b'{"ready": 1}', 400, "true or false"),
        ]:
            answer = await client.post(path, content=content)
            assert answer.status_code == status, (path, answer.text)
            assert text in answer.json()["error"]

    run(repo, body)


def test_model_control_off_is_forbidden(repo):
    async def body(client, app):
        answer = await client.post("/v2/repository/models/calc/unload")
        assert answer.status_code == 403 and "--model-control" in answer.json()["error"]

    async def main():
        settings = Settings(repository=repo, model_control=False)
        engine = build_engine(settings, repository=Repository(repo), runtime_factory=factory)
        await engine.start(wait=True)
        transport = httpx.ASGITransport(app=create_app(engine, settings))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                await body(client, None)
        finally:
            await engine.stop()

    asyncio.run(main())


# -- API keys -------------------------------------------------------------------------------


def test_api_keys_and_scopes(repo, tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    _, reader = store.create("reader", ["infer"], models=["calc"])
    _, ops = store.create("ops", ["metrics"])
    _, admin = store.create("admin", ["manage"])

    def bearer(key):
        return {"Authorization": f"Bearer {key}"}

    async def body(client, app):
        infer = "/v2/models/calc/infer"
        assert (await client.get("/v2/health/ready")).status_code == 200  # no key needed
        missing = await client.post(infer, content=GOOD)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith(
            "Bearer"
        )
        forged = await client.post(infer, content=GOOD, headers=bearer(reader[:-4] + "AAAA"))
        assert forged.status_code == 401
        secret = reader[len("ssk_") + 12 + 1 :]  # the secret may itself contain "_"
        assert len(secret) == 43 and secret[:-4] not in forged.text  # never echoed
        assert (await client.post(infer, content=GOOD, headers=bearer(ops))).status_code == 403
        other_model = await client.post(
            "/v2/models/text/infer", content=GOOD, headers=bearer(reader)
        )
        assert other_model.status_code == 403
        ok = await client.post(infer, content=GOOD, headers=bearer(reader))
        assert ok.status_code == 200, ok.text
        for path, key, status in [
            ("/v2", None, 401),
            ("/v2", reader, 200),
            ("/v2/models/calc", reader, 200),
            ("/v2/models/calc/config", ops, 403),
            ("/v2/models/calc/stats", reader, 403),
            ("/v2/models/calc/stats", ops, 200),
            ("/v2/models/stats", ops, 200),
            ("/metrics", reader, 403),
        ]:
            answer = await client.get(path, headers=bearer(key) if key else {})
            assert answer.status_code == status, (path, answer.text)
        metrics = await client.get("/metrics", headers=bearer(ops))
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/")
        unload = "/v2/repository/models/text/unload"
        assert (await client.post(unload, headers=bearer(reader))).status_code == 403
        assert (await client.post(unload, headers=bearer(admin))).status_code == 200

    run(repo, body, api_keys_file=tmp_path / "keys.json")


# -- the boundary -----------------------------------------------------------------------------


def broken_model_config(name: str, version: str | None = None) -> ModelSettings:
    """A model_config with a bug (not a SlimserveError)."""
    raise KeyError("secret internals")


def test_unexpected_errors_are_a_generic_500_logged_once(repo, caplog):
    async def main():
        settings = Settings(repository=repo)
        engine = build_engine(settings, repository=Repository(repo), runtime_factory=factory)
        engine.model_config = broken_model_config  # type: ignore[method-assign]
        await engine.start(wait=True)
        transport = httpx.ASGITransport(app=create_app(engine, settings))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answer = await client.get("/v2/models/calc/config")
                good = await client.get("/v2/models/calc")
        finally:
            await engine.stop()
        return answer, good

    with caplog.at_level(logging.ERROR, logger="slimserve.http"):
        answer, good = asyncio.run(main())
    assert answer.status_code == 500
    assert "secret" not in answer.text and "internal server error" in answer.json()["error"]
    records = [r for r in caplog.records if r.name == "slimserve.http"]
    assert len(records) == 1 and "secret internals" in records[0].exc_text
    assert good.status_code == 200
