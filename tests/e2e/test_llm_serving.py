"""A language model behind a real `slimserve serve` with API keys: v2 sampling parameters over
HTTP (tritonclient, curl) and gRPC, the OpenAI routes' protections (401/403, 413, 429 with
Retry-After, deadlines) through the `openai` client, /v1/models with variants, the token
metrics on /metrics, and a client leaving mid-stream freeing its sequence and KV blocks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from slimserve.security.keys import KeyStore
from tests.e2e.conftest import ServerProcess, start_server, stop_server
from tests.runtimes.llm.conftest import tiny_llama_dir  # noqa: F401 - a fixture
from tests.transport.test_openai import LM_YAML

openai = pytest.importorskip("openai")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")

pytestmark = pytest.mark.timeout(180)

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana-dashboard.json"
MAX_BODY = 100_000


class Keys:
    def __init__(self, folder: Path) -> None:
        self.path = folder / "keys.json"
        store = KeyStore(self.path)
        self.full = store.create("full", ["infer", "metrics"])[1]
        self.tiny_only = store.create("tiny-only", ["infer"], models=["tiny"])[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("llm-keys"))


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama_dir: Path,  # noqa: F811
    keys: Keys,
) -> Iterator[ServerProcess]:
    """tiny (and a hand-made variant tiny:copy); limited: one request per 100 s."""
    root = tmp_path_factory.mktemp("llm-e2e") / "models"
    for name, extra in (("tiny", ""), ("limited", "limits: {rate: 0.01, burst: 1}\n")):
        (root / name).mkdir(parents=True)
        (root / name / "model.yaml").write_text(LM_YAML + extra)
        shutil.copytree(tiny_llama_dir, root / name / "1")
    shutil.copytree(tiny_llama_dir, root / "tiny" / "1" / "variants" / "copy")
    options = ("--api-keys-file", str(keys.path), "--max-body-bytes", str(MAX_BODY))
    proc = start_server(root, root.parent / "server.log", *options)
    yield proc
    for lm in _CLIENTS.values():
        lm.close()
    _CLIENTS.clear()
    stop_server(proc)
    assert proc.process.returncode == 0, f"server did not stop cleanly:\n{proc.log()}"


_CLIENTS: dict[tuple[int, str], Any] = {}  # closed when the server stops


def client(server: ServerProcess, key: str) -> Any:
    found = _CLIENTS.get((server.http_port, key))
    if found is None:
        url = f"http://127.0.0.1:{server.http_port}/v1"
        found = _CLIENTS[server.http_port, key] = openai.OpenAI(
            base_url=url, api_key=key, max_retries=0
        )
    return found


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def greedy(server: ServerProcess, key: str, prompt: str, max_tokens: int) -> str:
    result = client(server, key).completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0
    )
    return str(result.choices[0].text)


def text_input(module: Any, prompts: list[str]) -> Any:
    tensor = module.InferInput("text", [len(prompts)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=object))
    return tensor


def texts(result: Any) -> list[str]:
    return [t.decode() for t in result.as_numpy("text")]


# -- v2 sampling parameters ------------------------------------------------------------------


def test_v2_http_parameters_through_tritonclient(server: ServerProcess, keys: Keys) -> None:
    full = greedy(server, keys.full, "hello world", 12)
    stop = full[3:5]
    triton = httpclient.InferenceServerClient(server.http_url)
    try:

        def infer(**parameters: Any) -> list[str]:
            result = triton.infer(
                "tiny",
                [text_input(httpclient, ["hello world"])],
                parameters=parameters,
                headers=bearer(keys.full),
            )
            return texts(result)

        assert infer(max_tokens=12, temperature=0) == [full]
        assert infer(max_tokens=3) == [greedy(server, keys.full, "hello world", 3)]
        assert infer(max_tokens=12, stop=stop) == [full[: full.index(stop)]]
        seeded = [infer(max_tokens=12, temperature=1.5, seed=s) for s in (4, 4, 5)]
        assert seeded[0] == seeded[1] != seeded[2]
        with pytest.raises(httpclient.InferenceServerException) as bad:
            infer(temperature=9)
        assert "temperature" in str(bad.value) and "0 to 2" in str(bad.value)
    finally:
        triton.close()


def test_v2_grpc_parameters_and_deadline(server: ServerProcess, keys: Keys) -> None:
    full = greedy(server, keys.full, "hello world", 12)
    stop = full[3:5]
    triton = grpcclient.InferenceServerClient(server.grpc_url)
    headers = {"authorization": f"Bearer {keys.full}"}  # gRPC metadata keys are lowercase
    try:

        def infer(**kwargs: Any) -> list[str]:
            prompt = [text_input(grpcclient, ["hello world"])]
            return texts(triton.infer("tiny", prompt, headers=headers, **kwargs))

        assert infer(parameters={"max_tokens": 12, "temperature": 0.0}) == [full]
        assert infer(parameters={"max_tokens": 3}) == [greedy(server, keys.full, "hello world", 3)]
        assert infer(parameters={"max_tokens": 12, "stop": stop}) == [full[: full.index(stop)]]
        with pytest.raises(grpcclient.InferenceServerException) as bad:
            infer(parameters={"top_p": 1.5})
        assert bad.value.status() == "StatusCode.INVALID_ARGUMENT" and "top_p" in str(bad.value)
        with pytest.raises(grpcclient.InferenceServerException) as late:
            # 5 ms (Triton's microseconds): time to be admitted, not for 400 tokens.
            infer(parameters={"max_tokens": 400}, timeout=5000)
        assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        triton.close()


def test_v2_parameters_with_curl_as_the_readme_shows(server: ServerProcess, keys: Keys) -> None:
    body = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello world"]}],
        "parameters": {"max_tokens": 3, "temperature": 0},
    }
    out = subprocess.run(
        [
            "curl",
            "-s",
            f"http://127.0.0.1:{server.http_port}/v2/models/tiny/infer",
            "-H",
            f"Authorization: Bearer {keys.full}",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    (output,) = json.loads(out.stdout)["outputs"]
    assert output["data"] == [greedy(server, keys.full, "hello world", 3)]


# -- the OpenAI routes' protections ----------------------------------------------------------


def test_models_list_variants_and_keys_limit_them(server: ServerProcess, keys: Keys) -> None:
    listed = {m.id: m for m in client(server, keys.full).models.list()}
    assert sorted(listed) == ["limited", "tiny", "tiny:copy"]
    assert listed["tiny:copy"].owned_by == "slimserve" and listed["tiny:copy"].created > 0
    assert client(server, keys.full).models.retrieve("tiny:copy").id == "tiny:copy"
    with pytest.raises(openai.NotFoundError):
        client(server, keys.full).models.retrieve("tiny:nope")
    mine = [m.id for m in client(server, keys.tiny_only).models.list()]
    assert mine == ["tiny", "tiny:copy"]  # a key for a model covers its variants


def test_auth_401_and_403_in_the_openai_shape(server: ServerProcess, keys: Keys) -> None:
    with pytest.raises(openai.AuthenticationError) as anonymous:
        greedy(server, "not-a-key", "hi", 1)
    assert anonymous.value.status_code == 401
    assert anonymous.value.body["type"] == "authentication_error"
    with pytest.raises(openai.PermissionDeniedError) as other:
        client(server, keys.tiny_only).completions.create(model="limited", prompt="hi")
    assert other.value.status_code == 403


def test_rate_limit_429_with_retry_after(server: ServerProcess, keys: Keys) -> None:
    lm = client(server, keys.full)
    lm.completions.create(model="limited", prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as limited:
        lm.completions.create(model="limited", prompt="hi", max_tokens=1)
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert limited.value.body["type"] == "rate_limit_error"


def test_body_over_the_limit_is_a_413(server: ServerProcess, keys: Keys) -> None:
    with pytest.raises(openai.APIStatusError) as large:
        client(server, keys.full).completions.create(model="tiny", prompt="x" * MAX_BODY)
    assert large.value.status_code == 413
    assert "--max-body-bytes" in large.value.body["message"]


def test_request_timeout_is_a_504(server: ServerProcess, keys: Keys) -> None:
    lm = client(server, keys.full)
    with pytest.raises(openai.InternalServerError) as late:
        lm.completions.create(
            model="tiny", prompt="hello", max_tokens=200, extra_body={"timeout": 1e-6}
        )
    assert late.value.status_code == 504 and late.value.body["code"] == "deadline_exceeded"


# -- metrics and cancellation ----------------------------------------------------------------


def scrape(server: ServerProcess, key: str) -> str:
    response = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics", headers=bearer(key))
    assert response.status_code == 200, response.text
    return response.text


def metric(server: ServerProcess, key: str, name: str, **labels: str) -> float:
    text = scrape(server, key)
    for line in text.splitlines():
        match = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


def test_metrics_have_every_language_model_series_the_dashboard_queries(
    server: ServerProcess, keys: Keys
) -> None:
    greedy(server, keys.full, "hello", 4)
    text = scrape(server, keys.full)
    exported = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln[:1] != "#"}
    prefixes = ("slimserve_generation_", "slimserve_kv_cache_", "slimserve_prefix_cache_")
    wanted = {
        w for w in re.findall(r"slimserve_[a-z_]+", DASHBOARD.read_text()) if w.startswith(prefixes)
    }
    assert len(wanted) >= 10 and not wanted - exported, sorted(wanted - exported)


def test_leaving_mid_stream_frees_the_sequence(server: ServerProcess, keys: Keys) -> None:
    tiny = {"model": "tiny", "variant": ""}

    def finished(reason: str) -> float:
        return metric(
            server, keys.full, "slimserve_generation_finished_total", **tiny, reason=reason
        )

    # 500 tokens take the tiny model ~0.5 s, ~10x what the client needs to hang up; should a
    # stalled client still be slower, the generation ends by length: try again.
    request = {"model": "tiny", "prompt": "hello", "max_tokens": 500, "temperature": 0}
    request["ignore_eos"] = True
    url = f"http://127.0.0.1:{server.http_port}/v1/completions"
    for _ in range(3):
        aborted, by_length = finished("abort"), finished("length")
        with httpx.stream(
            "POST", url, json={**request, "stream": True}, headers=bearer(keys.full), timeout=30
        ) as response:
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert first.startswith("data: {")
        # The connection is closed: the server cancels the request and frees its KV blocks at
        # the engine's next iteration.
        for _ in range(100):
            freed = metric(server, keys.full, "slimserve_generation_running_sequences", **tiny) == 0
            if freed and metric(server, keys.full, "slimserve_kv_cache_blocks_used", **tiny) == 0:
                break
            time.sleep(0.05)
        if finished("length") == by_length:
            break
    assert metric(server, keys.full, "slimserve_generation_running_sequences", **tiny) == 0
    assert metric(server, keys.full, "slimserve_kv_cache_blocks_used", **tiny) == 0
    after = finished("abort")
    assert after == aborted + 1  # cancelled mid-way, not finished by stop or length
