"""A quantized LM variant made by `slimserve optimize` (the real CLI), served by a real
`slimserve serve` process and answered through the `openai` client, addressed NAME:VARIANT;
its greedy completion equals the same variant's in-process engine output (closeness to the
original's output: tests/runtimes/llm/test_prequant.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slimserve.cli import main
from tests.e2e.conftest import ServerProcess, start_server, stop_server
from tests.optimize.lm_fixtures import lm_repository, trained_llama_dir  # noqa: F401
from tests.runtimes.llm.test_prequant import _greedy

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(180)

PROMPT = "the river rose slowly through the spring, and the people of"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, trained_llama_dir: Path) -> Path:  # noqa: F811
    root = lm_repository(tmp_path_factory.mktemp("llm-variants") / "models", trained_llama_dir)
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
