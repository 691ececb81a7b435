"""The OpenAI routes get the v2 routes' protections, in process over the real Engine: body
size (413 before reading), text limits, deadlines, shedding (503), every error in the OpenAI
shape; /v1/models lists variants; v2 sampling parameters for text models; token metrics."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from slimserve.app import build_engine
from slimserve.config import Settings
from slimserve.repository import Repository
from slimserve.transport.asgi import create_app
from tests.runtimes.llm.conftest import tiny_llama_dir  # noqa: F401 - a fixture
from tests.transport.test_openai import GREEDY, LM_YAML, error_of, run

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:  # noqa: F811
    """tiny (and its hand-made variant tiny:copy); busy: one request at a time; bounded: a
    server-side timeout too short for any generation."""
    root = tmp_path_factory.mktemp("openai-protections") / "models"
    extra = {"busy": "limits: {max_concurrency: 1}\n", "bounded": ""}
    for name in ("tiny", "busy", "bounded"):
        (root / name).mkdir(parents=True)
        text = LM_YAML + extra.get(name, "")
        if name == "bounded":
            text = text.replace("parameters: {max_tokens: 6}", "parameters: {timeout_s: 1.0e-6}")
        (root / name / "model.yaml").write_text(text)
        shutil.copytree(tiny_llama_dir, root / name / "1")
    shutil.copytree(tiny_llama_dir, root / "tiny" / "1" / "variants" / "copy")
    return root


def v2(prompts: list[str], **parameters: Any) -> dict[str, Any]:
    tensor = {"name": "text", "datatype": "BYTES", "shape": [len(prompts)], "data": prompts}
    return {"inputs": [tensor], "parameters": parameters}


# -- /v1/models ------------------------------------------------------------------------------


def test_models_list_every_variant_and_one_by_name(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> tuple[Any, ...]:
        listing = (await client.get("/v1/models")).json()
        one = (await client.get("/v1/models/tiny:copy")).json()
        missing = await client.get("/v1/models/tiny:nope")
        base = await client.post("/v1/completions", json={**GREEDY, "prompt": "hello world"})
        copy = await client.post(
            "/v1/completions", json={**GREEDY, "model": "tiny:copy", "prompt": "hello world"}
        )
        return listing, one, missing, base, copy

    listing, one, missing, base, copy = run(repo, body)
    rows = {m["id"]: m for m in listing["data"]}
    assert sorted(rows) == ["bounded", "busy", "tiny", "tiny:copy"]
    assert rows["tiny:copy"]["parent"] == "tiny" and rows["tiny"]["parent"] is None
    assert all(m["object"] == "model" and m["owned_by"] == "slimserve" for m in rows.values())
    assert all(m["created"] > 1_600_000_000 for m in rows.values())  # a real time, in seconds
    assert one == rows["tiny:copy"]
    assert error_of(missing, 404)["code"] == "model_not_found"
    # The variant is servable by that name (same weights: the same greedy text).
    assert copy.json()["choices"][0]["text"] == base.json()["choices"][0]["text"]


# -- bodies and limits -----------------------------------------------------------------------


async def _raw(app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> list[Any]:
    """POST /v1/completions as raw ASGI; returns what the app sent and how many body
    chunks it read."""
    sent: list[Any] = []
    pending = list(chunks)
    reads = []

    async def receive() -> dict[str, Any]:
        reads.append(1)
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
    }
    await app(scope, receive, send)
    return [sent[0]["status"], orjson.loads(sent[1]["body"]), len(reads)]


def test_body_over_the_limit_is_a_413_before_reading(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> tuple[Any, ...]:
        declared = await _raw(app, [(b"content-length", b"999999")], [b"x" * 10])
        chunked = await _raw(app, [], [b"x" * 600, b"x" * 600, b"x" * 600])
        encoded = await _raw(app, [(b"content-encoding", b"gzip")], [b"{}"])
        return declared, chunked, encoded

    declared, chunked, encoded = run(repo, body, max_body_bytes=1000)
    assert declared[0] == 413 and declared[2] == 0  # no chunk read
    assert declared[1]["error"]["type"] == "invalid_request_error"
    assert "--max-body-bytes" in declared[1]["error"]["message"]
    assert chunked[0] == 413 and chunked[2] == 2  # stopped at the chunk that passed the limit
    assert encoded[0] == 501 and "uncompressed" in encoded[1]["error"]["message"]


def test_text_limits_apply_to_prompts_messages_and_inputs(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> list[httpx.Response]:
        long = "x" * 80
        return [
            await client.post("/v1/completions", json={**GREEDY, "prompt": long}),
            await client.post("/v1/completions", json={**GREEDY, "prompt": ["a"] * 5}),
            await client.post("/v1/completions", json={**GREEDY, "prompt": [[5] * 6]}),
            await client.post(
                "/v1/chat/completions",
                json={**GREEDY, "messages": [{"role": "user", "content": "é" * 40}]},
            ),
            await client.post("/v1/completions", json={**GREEDY, "prompt": "fine"}),
        ]

    long, many, ids, chat, fine = run(repo, body, max_string_bytes=64, max_tensor_elements=4)
    assert error_of(long, 400)["param"] == "prompt"
    assert "--max-string-bytes" in long.json()["error"]["message"]
    assert "--max-tensor-elements" in error_of(many, 400)["message"]
    assert error_of(ids, 400)["param"] == "prompt"
    assert error_of(chat, 400)["param"] == "messages"  # 80 UTF-8 bytes in 40 characters
    assert fine.status_code == 200, fine.text


def test_max_tokens_past_the_context_is_a_400(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> httpx.Response:
        return await client.post(
            "/v1/completions", json={**GREEDY, "prompt": "hi", "max_tokens": 100_000}
        )

    error = error_of(run(repo, body), 400)
    assert "context" in error["message"] and "max_tokens" in error["message"]


def test_timeouts_the_request_s_and_the_server_s(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> list[httpx.Response]:
        long = {**GREEDY, "prompt": "hello", "max_tokens": 200}
        return [
            await client.post("/v1/completions", json={**long, "timeout": 0}),
            await client.post("/v1/completions", json={**long, "timeout": "soon"}),
            await client.post("/v1/completions", json={**long, "timeout": 1e-6}),
            await client.post("/v1/completions", json={**long, "model": "bounded"}),
            await client.post("/v2/models/bounded/infer", json=v2(["hello"])),
            await client.post("/v1/completions", json={**long, "timeout": 60}),
        ]

    zero, bad, short, bounded, bounded_v2, ample = run(repo, body)
    assert error_of(zero, 504)["code"] == "deadline_exceeded"
    assert error_of(bad, 400)["param"] == "timeout"
    assert "deadline" in error_of(short, 504)["message"]
    assert error_of(bounded, 504)["code"] == "deadline_exceeded"
    assert bounded_v2.status_code == 504, bounded_v2.text
    assert ample.status_code == 200, ample.text


def test_a_model_at_its_concurrency_limit_sheds_with_503(repo: Path) -> None:
    """A stream held open (its client not reading) occupies 'busy'; the next request is
    shed with 503 and Retry-After, in the OpenAI shape; once it ends, 'busy' serves again."""

    async def main() -> tuple[int, Any, Any, int]:
        settings = Settings(repository=repo)
        engine = build_engine(settings, repository=Repository(repo))
        await engine.start(wait=True)
        app = create_app(engine, settings)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        held, release = asyncio.Event(), asyncio.Event()
        request = {**GREEDY, "model": "busy", "prompt": "hello", "max_tokens": 50, "stream": True}
        messages = [{"type": "http.request", "body": orjson.dumps(request)}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # never disconnects
            return {}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                held.set()
                await release.wait()  # a client that stopped reading

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        stream = asyncio.create_task(app(scope, receive, send))
        await held.wait()
        small = {**GREEDY, "model": "busy", "prompt": "hi", "max_tokens": 1}
        shed = await client.post("/v1/completions", json=small)
        release.set()
        await asyncio.wait_for(stream, 30)
        after = await client.post("/v1/completions", json=small)
        await client.aclose()
        await engine.stop()
        return shed.status_code, shed.json(), shed.headers.get("retry-after"), after.status_code

    status, doc, retry, after = asyncio.run(main())
    assert status == 503 and set(doc["error"]) == {"message", "type", "param", "code"}
    assert "busy" in doc["error"]["message"] and doc["error"]["code"] == "unavailable"
    assert retry is not None and int(retry) >= 1
    assert after == 200


# -- v2 sampling parameters ------------------------------------------------------------------


def test_v2_parameters_reach_generation(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> dict[str, Any]:
        async def infer(prompts: list[str], **parameters: Any) -> Any:
            response = await client.post("/v2/models/tiny/infer", json=v2(prompts, **parameters))
            assert response.status_code == 200, response.text
            return response.json()["outputs"][0]["data"]

        async def complete(**fields: Any) -> str:
            doc = {**GREEDY, "prompt": "hello world", **fields}
            response = await client.post("/v1/completions", json=doc)
            return str(response.json()["choices"][0]["text"])

        return {
            "three": await infer(["hello world"], max_tokens=3),
            "three_openai": await complete(max_tokens=3),
            "twelve": await infer(["hello world"], max_tokens=12),
            "twelve_openai": await complete(max_tokens=12),
            "sampled": [
                await infer(["hello world"], max_tokens=12, temperature=1.5, seed=s)
                for s in (1, 1, 2)
            ],
            "sampled_openai": await complete(max_tokens=12, temperature=1.5, seed=1),
            "penalized": await infer(
                ["hello world"], max_tokens=12, presence_penalty=2.0, frequency_penalty=2.0
            ),
            "penalized_openai": await complete(
                max_tokens=12, presence_penalty=2.0, frequency_penalty=2.0
            ),
        }

    out = run(repo, body)
    assert out["three"] == [out["three_openai"]]
    assert out["twelve"] == [out["twelve_openai"]] and out["twelve"] != out["three"]
    first, again, other = out["sampled"]
    assert first == again == [out["sampled_openai"]] and first != other
    assert out["penalized"] == [out["penalized_openai"]]


def test_v2_text_requests_count_in_the_model_statistics(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> tuple[Any, Any]:
        await client.post("/v2/models/tiny/infer", json=v2(["one", "two"], max_tokens=2))
        await client.post("/v2/models/tiny/infer", json=v2(["three"], max_tokens=2))
        bad = await client.post("/v2/models/tiny/infer", json=v2(["x"], max_tokens=-1))
        stats = (await client.get("/v2/models/tiny/stats")).json()["model_stats"]
        return bad.status_code, stats

    status, stats = run(repo, body)
    assert status == 400
    original = next(s for s in stats if s["name"] == "tiny")
    assert original["inference_stats"]["success"]["count"] == 2
    assert original["inference_count"] == 3  # rows: prompts
    assert original["execution_count"] == 2


def test_v2_stop_and_top_p(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> tuple[Any, ...]:
        async def infer(**parameters: Any) -> str:
            response = await client.post(
                "/v2/models/tiny/infer", json=v2(["hello world"], max_tokens=12, **parameters)
            )
            assert response.status_code == 200, response.text
            return str(response.json()["outputs"][0]["data"][0])

        full = await infer()
        stop = full[3:5]
        return (
            full,
            stop,
            await infer(stop=stop),
            await infer(stop=[stop, "zzz"]),
            await infer(temperature=1.0, top_p=1e-6),
        )

    full, stop, cut, cut_list, nucleus = run(repo, body)
    assert cut == cut_list == full[: full.index(stop)]
    assert nucleus == full  # top_p that small keeps only the most likely token: greedy


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": 1.5}, "seed"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"frequency_penalty": True}, "frequency_penalty"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"n": 2}, "n=2"),
        ({"max_tokens": 100_000}, "context"),
    ],
)
def test_v2_bad_parameters_are_400_naming_them(
    repo: Path, parameters: dict[str, Any], named: str
) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> httpx.Response:
        return await client.post("/v2/models/tiny/infer", json=v2(["hi"], **parameters))

    response = run(repo, body)
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]


# -- token metrics ---------------------------------------------------------------------------


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (labels in any order)."""
    for line in text.splitlines():
        match = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"no sample {name} {labels} in the metrics")


def test_token_metrics_count_what_the_responses_report(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> tuple[Any, str]:
        doc = {**GREEDY, "prompt": ["hello world", "the cat sat on"], "max_tokens": 5}
        reply = (await client.post("/v1/completions", json=doc)).json()
        await client.post("/v2/models/tiny/infer", json=v2(["one"], max_tokens=4))
        return reply, (await client.get("/metrics")).text

    reply, text = run(repo, body)
    tiny = {"model": "tiny", "variant": ""}
    usage = reply["usage"]
    v2_prompt = 3  # [CLS] one [SEP]
    assert sample(text, "slimserve_generation_prompt_tokens_total", **tiny) == (
        usage["prompt_tokens"] + v2_prompt
    )
    generated = usage["completion_tokens"] + 4
    assert sample(text, "slimserve_generation_tokens_total", **tiny) == generated
    reasons = [c["finish_reason"] for c in reply["choices"]] + ["length"]
    for reason in ("stop", "length"):
        finished = sample(text, "slimserve_generation_finished_total", **tiny, reason=reason)
        assert finished == reasons.count(reason)
    assert sample(text, "slimserve_generation_finished_total", **tiny, reason="abort") == 0
    ttft = "slimserve_generation_time_to_first_token_seconds_count"
    assert sample(text, ttft, **tiny) == 3  # one per request (two prompts, one v2)
    itl = sample(text, "slimserve_generation_inter_token_seconds_count", **tiny)
    assert itl == generated - 3  # every token after a choice's first
    assert sample(text, "slimserve_generation_request_duration_seconds_count", **tiny) == 3
    assert sample(text, "slimserve_generation_running_sequences", **tiny) == 0
    assert sample(text, "slimserve_generation_waiting_sequences", **tiny) == 0
    assert sample(text, "slimserve_kv_cache_blocks_used", **tiny) == 0
    assert sample(text, "slimserve_kv_cache_capacity_blocks", **tiny) > 0
    assert sample(text, "slimserve_prefix_cache_hit_tokens_total", **tiny) >= 0
    # The Gateway API Inference Extension's three gauges, over all language models.
    for gauge in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc"):
        assert re.search(rf"^slimserve_{gauge} 0\.0$", text, re.M), gauge
