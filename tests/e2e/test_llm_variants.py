"""A quantized LM variant made by `slimserve optimize` (the real CLI), served by a real
`slimserve serve` process and answered through the `openai` client, addressed NAME:VARIANT;
its greedy completion equals the same variant's in-process engine output (closeness to the
original's output: tests/runtimes/llm/test_prequant.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from slimserve.cli import main
from tests.e2e.conftest import ServerProcess, start_server, stop_server
from tests.optimize.lm_fixtures import lm_repository, trained_llama_dir  # noqa: F401
from tests.runtimes.llm.conftest import CHAT_TEMPLATE
from tests.runtimes.llm.test_prequant import _greedy

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(180)

PROMPT = "the river rose slowly through the spring, and the people of"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, trained_llama_dir: Path) -> Path:  # noqa: F811
    root = lm_repository(tmp_path_factory.mktemp("llm-variants") / "models", trained_llama_dir)
    config = root / "tiny/1/tokenizer_config.json"  # a chat template, for /v1/chat/completions
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "chat_template": CHAT_TEMPLATE})
    )
    argv = ["optimize", "tiny", "-r", str(root), "--recipe", "int8", "--recipe", "int4:group=32"]
    assert main([*argv, "--min-time-s", "0"]) == 0
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    proc = start_server(repo, repo.parent / "server.log")
    yield proc
    stop_server(proc)
    assert proc.process.returncode == 0, f"server did not stop cleanly:\n{proc.log()}"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0
    )


def _in_process(folder: Path) -> str:
    from slimserve.runtimes.llm.runtime import TextGenerationRuntime

    runtime = TextGenerationRuntime.load(folder)
    return runtime.decode(_greedy(runtime, runtime.encode(PROMPT), 10))


@pytest.mark.parametrize("variant", ["int8", "int4group32"])
def test_the_variant_answers_completions(client: Any, repo: Path, variant: str) -> None:
    result = client.completions.create(
        model=f"tiny:{variant}", prompt=PROMPT, max_tokens=10, temperature=0
    )
    text = result.choices[0].text
    assert result.usage.completion_tokens == 10
    assert text == _in_process(repo / "tiny/1/variants" / variant)


def test_the_original_still_answers_alongside(client: Any, repo: Path) -> None:
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    assert result.choices[0].text == _in_process(repo / "tiny/1")


def test_an_unknown_variant_is_not_found(client: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny:int3", prompt=PROMPT, max_tokens=2)


# -- per-request latency objective (extension fields, sent with the client's extra_body) ------


def _decode_ms(repo: Path, variant: str | None) -> float:
    """The profile's decode step at one stream, as `slimserve optimize` wrote it."""
    folder = repo / "tiny/1"
    path = folder / "profile.yaml" if variant is None else folder / "variants" / variant
    path = path if variant is None else path / "variant.yaml"
    return float(yaml.safe_load(path.read_text())["profile"]["latency_ms_batch1"])


def _objective(client: Any, model: str, max_tokens: int, **fields: Any) -> tuple[Any, Any]:
    raw = client.completions.with_raw_response.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body=fields
    )
    result = raw.parse()
    return result, {**result.model_extra["slimserve"], "headers": raw.headers}


def test_an_objective_picks_the_unit_by_the_profiles(client: Any, repo: Path) -> None:
    # One stream at a time: the server predicts (max_tokens + 1) decode steps at one stream.
    steps = 8 + 1
    predicted = {v: _decode_ms(repo, v) * steps for v in (None, "int8", "int4group32")}
    loose, said = _objective(client, "tiny", 8, latency_slo_ms=60_000, max_quality_loss=100)
    assert said["slo_variant"] == "" and said["slo_reachable"] is True  # least loss: original
    assert loose.model == "tiny" and said["predicted_latency_ms"] == pytest.approx(
        predicted[None], rel=1e-3
    )
    fastest = min(predicted, key=lambda v: predicted[v])
    tight, said = _objective(
        client, "tiny", 8, latency_slo_ms=predicted[fastest] * 1.0001, max_quality_loss=100
    )
    assert (said["slo_variant"], said["slo_reachable"]) == (fastest or "", True)
    # `model` stays the name asked (as when pressure degrades); the unit is named beside it.
    assert tight.model == "tiny" and said["headers"].get("x-slimserve-variant") == fastest
    unit_dir = repo / "tiny/1" / ("" if fastest is None else f"variants/{fastest}")
    assert _in_process(unit_dir).startswith(tight.choices[0].text)  # 8 of its 10 tokens
    # Nothing is that fast: the fastest within the budget answers and says so; with no
    # quality to give, that is the original.
    half = predicted[fastest] / 2
    _, said = _objective(client, "tiny", 8, latency_slo_ms=half, max_quality_loss=100)
    assert (said["slo_variant"], said["slo_reachable"]) == (fastest or "", False)
    _, said = _objective(client, "tiny", 8, latency_slo_ms=half, max_quality_loss=0)
    assert (said["slo_variant"], said["slo_reachable"]) == ("", False)
    assert said["headers"]["x-slimserve-slo-reachable"] == "false"


def test_a_named_variant_answers_and_the_objective_is_not_considered(client: Any) -> None:
    result, said = _objective(client, "tiny:int8", 4, latency_slo_ms=0.001)
    assert result.model == "tiny:int8" and said == {
        "slo_considered": False,
        "headers": said["headers"],
    }
    assert said["headers"]["x-slimserve-slo-considered"] == "false"


def test_chat_takes_the_objective_and_a_bad_one_is_a_400(client: Any) -> None:
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=4,
        extra_body={"latency_slo_ms": 60_000},
    )
    assert chat.model_extra["slimserve"]["slo_considered"] is True
    with pytest.raises(openai.BadRequestError, match="latency_slo_ms"):
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"latency_slo_ms": -5}
        )
    with pytest.raises(openai.BadRequestError, match="needs 'latency_slo_ms'"):
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"max_quality_loss": 1}
        )
