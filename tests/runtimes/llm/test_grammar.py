"""Constrained decoding (llguidance) and the extra sampling parameters, through the engine.

A tiny random model writes junk; under a grammar its junk must still parse and validate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from slimserve.errors import InvalidArgument
from slimserve.runtimes.llm import (
    EngineConfig,
    GenerationEngine,
    SamplingParams,
    TextGenerationRuntime,
)
from slimserve.runtimes.llm.params import Grammar

from .helpers import collect, greedy_reference, run, text_of, tokens_of

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def runtime(tiny_bpe_dir: Path) -> TextGenerationRuntime:
    return TextGenerationRuntime.load(tiny_bpe_dir)


@pytest.fixture(scope="module")
def engine(runtime: TextGenerationRuntime) -> Iterator[GenerationEngine]:
    config = EngineConfig(block_size=16, kv_cache_bytes=8 * 2**20, max_seqs=8)
    engine = GenerationEngine(runtime.model, runtime.tokenizer, config, runtime.eos_token_ids)
    engine.start()
    yield engine
    engine.close()


def test_json_schema_output_always_parses_and_validates(engine: GenerationEngine) -> None:
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=3, n=6, grammar=grammar)
    events = run(collect(engine, PROMPT, params))
    for index in range(6):
        finish = [e.finish_reason for e in events if e.index == index and e.finish_reason]
        assert finish == ["stop"]  # ended by the grammar, not by max_tokens
        jsonschema.validate(json.loads(text_of(events, index)), SCHEMA)
    greedy = SamplingParams(max_tokens=120, temperature=0.0, grammar=grammar)
    jsonschema.validate(json.loads(text_of(run(collect(engine, PROMPT, greedy)))), SCHEMA)


def test_json_object_and_lark_grammars(engine: GenerationEngine) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, grammar=Grammar("lark", LARK))
    text = text_of(run(collect(engine, PROMPT, params)))
    assert text in ("yes", "no") or (text.startswith("n=") and text[2:].isdigit()), text
    params = SamplingParams(max_tokens=60, temperature=0.0, grammar=Grammar("json_object"))
    events = run(collect(engine, PROMPT, params))
    if events[-1].finish_reason == "stop":
        assert isinstance(json.loads(text_of(events)), dict)
    else:  # cut by max_tokens: still a JSON object's beginning
        assert text_of(events).startswith("{")


LARK = 'start: "yes" | "no" | "n=" /[0-9]{1,3}/'


def test_a_bad_schema_is_refused_before_any_token(engine: GenerationEngine) -> None:
    async def submit() -> None:
        engine.submit(PROMPT, SamplingParams(grammar=Grammar("json_schema", '{"type": 5}')))

    with pytest.raises(InvalidArgument, match="cannot be enforced"):
        run(submit())


def test_top_k_1_and_min_p_1_are_greedy(engine: GenerationEngine) -> None:
    greedy = tokens_of(run(collect(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0))))

    async def both() -> list[list[int]]:
        runs = [
            collect(engine, PROMPT, SamplingParams(max_tokens=8, top_k=1, seed=s)) for s in (1, 2)
        ] + [collect(engine, PROMPT, SamplingParams(max_tokens=8, min_p=1.0, seed=3))]
        return [tokens_of(e) for e in await asyncio.gather(*runs)]

    assert run(both()) == [greedy] * 3
    spread = SamplingParams(max_tokens=8, top_k=50, min_p=0.01, seed=4, n=4)
    assert len({tuple(tokens_of(run(collect(engine, PROMPT, spread)), i)) for i in range(4)}) > 1


def test_repetition_penalty_equals_generate(tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True).eval()
    prompt = [2000, 2001, 2002, 2000, 2001]
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=16,
        do_sample=False,
        repetition_penalty=0.5,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )[0, len(prompt) :].tolist()
    assert out != greedy_reference(hf, prompt, 16)  # < 1 favours seen tokens: a change
    runtime = TextGenerationRuntime.load(tiny_llama_dir)
    engine = GenerationEngine(runtime.model, runtime.tokenizer, EngineConfig(block_size=4))
    engine.start()
    try:
        params = SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=0.5)
        assert tokens_of(run(collect(engine, prompt, params))) == out
    finally:
        engine.close()
