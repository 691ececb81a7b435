"""The OpenAI routes get what the v2 routes have, from a real `slimserve serve` through the
openai client: the response cache for temperature-0 requests, degradation to a cheaper
variant while requests wait, and the circuit breaker (tripped here by slow calls: every
generation is slower than 1 ms). Size limits, timeouts, rate limits and auth: test_llm_serving.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import ServerProcess, start_server, stop_server
from tests.runtimes.llm.conftest import tiny_llama_dir  # noqa: F401 - a fixture
from tests.transport.test_openai import LM_YAML

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(300)

ASK = [{"role": "user", "content": "hello world"}]
BUSY = """\
cache: {max_bytes: 1048576}
degrade: {allow: true, queue_fraction: 0.5, recover_s: 0}
"""
BRITTLE = "breaker: {slow_call_ms: 1, slow_rate: 0.5, min_calls: 2, window: 2, open_s: 60}\n"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama_dir: Path,  # noqa: F811
) -> Iterator[ServerProcess]:
    """busy: one sequence at a time, a cache, and a variant `lite` to degrade to;
    brittle: a breaker that opens after two slow calls."""
    root = tmp_path_factory.mktemp("openai-parity") / "models"
    one_seq = LM_YAML.replace("max_seqs: 8", "max_seqs: 1")
    for name, extra in (("busy", BUSY), ("brittle", BRITTLE)):
        (root / name).mkdir(parents=True)
        (root / name / "model.yaml").write_text(one_seq + extra)
        shutil.copytree(tiny_llama_dir, root / name / "1")
    lite = root / "busy" / "1" / "variants" / "lite"
    shutil.copytree(tiny_llama_dir, lite)
    profile = {"latency_ms_batch1": 1.0, "agreement": 0.999}
    (lite / "variant.yaml").write_text(yaml.safe_dump({"recipe": "copy", "profile": profile}))
    proc = start_server(root, root.parent / "server.log")
    yield proc
    stop_server(proc)


def test_temperature_0_answers_come_from_the_cache(openai_client: Any) -> None:
    def ask() -> Any:
        return openai_client.chat.completions.with_raw_response.create(
            model="busy", messages=ASK, max_tokens=8, temperature=0
        )

    first, second = ask(), ask()
    assert first.headers["x-slimserve-cache"] == "miss"
    assert second.headers["x-slimserve-cache"] == "hit"
    one, two = first.parse(), second.parse()
    assert one.choices[0].message.content == two.choices[0].message.content
    assert one.id != two.id  # each answer its own id
    sampled = openai_client.chat.completions.with_raw_response.create(
        model="busy", messages=ASK, max_tokens=8, temperature=1.0
    )
    assert "x-slimserve-cache" not in sampled.headers  # only deterministic answers are kept


def test_requests_waiting_degrade_to_the_variant(openai_client: Any) -> None:
    long = {"model": "busy", "messages": ASK, "max_tokens": 400, "temperature": 1.0}
    with openai_client.chat.completions.create(
        **long, stream=True, extra_body={"ignore_eos": True}
    ) as running:
        next(iter(running))  # generating: it holds the only sequence slot
        waiter = threading.Thread(
            target=lambda: openai_client.chat.completions.create(**{**long, "max_tokens": 4})
        )
        waiter.start()  # waits for the slot: the model is under pressure
        time.sleep(0.3)
        reply = openai_client.chat.completions.with_raw_response.create(
            model="busy", messages=ASK, max_tokens=4, temperature=1.0
        )
    waiter.join()
    assert reply.headers["x-slimserve-variant"] == "lite"
    assert reply.headers["x-slimserve-degraded"] == "true"
    assert reply.parse().choices[0].finish_reason in ("stop", "length")
    calm = openai_client.chat.completions.with_raw_response.create(
        model="busy", messages=ASK, max_tokens=4, temperature=1.0
    )
    assert "x-slimserve-variant" not in calm.headers  # back on the original when calm


def test_the_breaker_opens_on_slow_calls_and_refuses_with_retry_after(openai_client: Any) -> None:
    for _ in range(2):
        openai_client.completions.create(model="brittle", prompt="hello", max_tokens=2)
    with pytest.raises(openai.APIStatusError) as refused:
        openai_client.completions.create(model="brittle", prompt="hello", max_tokens=2)
    assert refused.value.status_code == 503
    assert "circuit breaker is open" in refused.value.message
    assert int(refused.value.response.headers["retry-after"]) >= 1
