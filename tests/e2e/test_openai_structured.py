"""Structured output and tool calls from a real `slimserve serve`, through the openai client's
own helpers (`chat.completions.parse` with pydantic models, `pydantic_function_tool`).

`tiny` is a random-weight Llama with SmolLM2's tokenizer: its text is junk, so only the
constraint can make it parse and validate. `smollm2` is the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import ServerProcess, start_server, stop_server
from tests.runtimes.llm.conftest import tiny_bpe_dir  # noqa: F401 - a fixture

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(360)

YAML = """\
backend: transformers
task: text-generation
inputs:  [{name: text, datatype: BYTES, shape: [-1]}]
outputs: [{name: text, datatype: BYTES, shape: [-1]}]
generation: {kv_cache_bytes: 16777216, max_seqs: 8}
"""
ASK = [{"role": "user", "content": "Describe a person."}]


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    pet: Literal["cat", "dog", "none"]
    scores: list[bool] = Field(max_length=3)


class GetWeather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"]


class GetTime(BaseModel):
    """The time in a timezone."""

    zone: Literal["UTC", "CET", "PST"]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_bpe_dir: Path,  # noqa: F811
) -> Iterator[ServerProcess]:
    from slimserve.runtimes.llm import convert_gguf, smollm2_gguf

    gguf = smollm2_gguf()
    smollm2 = convert_gguf(
        gguf, Path(tempfile.gettempdir()) / f"slimserve-smollm2-{gguf.stat().st_size}"
    )
    root = tmp_path_factory.mktemp("structured") / "models"
    for name, folder in (("tiny", tiny_bpe_dir), ("smollm2", smollm2)):
        shutil.copytree(folder, root / name / "1")
        (root / name / "model.yaml").write_text(YAML)
    proc = start_server(root, root.parent / "server.log")
    yield proc
    stop_server(proc)


def test_parse_with_a_pydantic_model_always_validates(openai_client: Any) -> None:
    completion = openai_client.chat.completions.parse(
        model="tiny", messages=ASK, response_format=Person, max_tokens=150, n=4, seed=1
    )
    assert len(completion.choices) == 4
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)  # parsed and validated by the client
    greedy = openai_client.chat.completions.parse(
        model="tiny", messages=ASK, response_format=Person, max_tokens=150, temperature=0
    )
    assert isinstance(greedy.choices[0].message.parsed, Person)


def test_json_object_streamed(openai_client: Any) -> None:
    stream = openai_client.chat.completions.create(
        model="tiny",
        messages=ASK,
        response_format={"type": "json_object"},
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"top_k": 20, "repetition_penalty": 1.1},
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


def test_a_required_tool_call_is_parsed_by_the_client(openai_client: Any) -> None:
    tools = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]
    completion = openai_client.chat.completions.parse(
        model="tiny", messages=ASK, tools=tools, tool_choice="required", max_tokens=100, seed=2
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("GetWeather", "GetTime")
    assert isinstance(call.function.parsed_arguments, (GetWeather, GetTime))


def test_a_named_tool_call_streamed(openai_client: Any) -> None:
    tools = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]
    with openai_client.chat.completions.stream(
        model="tiny",
        messages=ASK,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "GetTime"}},
        max_tokens=60,
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "GetTime"
    assert isinstance(call.function.parsed_arguments, GetTime)
    assert final.choices[0].finish_reason == "tool_calls"


def test_auto_answers_text_or_a_valid_call(openai_client: Any) -> None:
    tools = [openai.pydantic_function_tool(GetTime)]
    completion = openai_client.chat.completions.create(
        model="tiny", messages=ASK, tools=tools, max_tokens=60, n=6, seed=5
    )
    for choice in completion.choices:
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            GetTime.model_validate_json(choice.message.tool_calls[0].function.arguments)
        else:
            assert not choice.message.content.startswith("<")  # text never starts a call


@pytest.mark.slow
def test_readme_example_smollm2_fills_a_schema_and_calls_a_tool(
    server: ServerProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's structured-output example as written, against the real SmolLM2."""
    from tests.test_readme import python_blocks

    (block,) = [b for b in python_blocks() if "response_format=" in b]
    code = block.replace("127.0.0.1:8000", f"127.0.0.1:{server.http_port}")
    # A real module: pydantic resolves the models' annotations in their module's namespace.
    module = types.ModuleType("readme_structured")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "README.md", "exec"), module.__dict__)
    printed = capsys.readouterr().out.splitlines()
    assert "capital='Paris'" in printed[0]
    assert printed[1] == "city='Paris' unit='celsius'"
