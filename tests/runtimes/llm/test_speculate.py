"""Speculative decoding (speculate.py): the output is plain greedy decoding's, token for token."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from slimserve.errors import InvalidArgument
from slimserve.runtimes.llm import (
    EngineConfig,
    GenerationEngine,
    SamplingParams,
    TextGenerationRuntime,
    fused,
    qgemv,
)
from slimserve.runtimes.llm.speculate import SpeculativeConfig, accept, lookup

from .helpers import collect, greedy_references, tokens_of

# A prompt that repeats itself, so prompt lookup finds drafts; one that does not.
PATTERN = [1500, 1501, 1502, 1503, 1504, 1505, 1506]
PROMPTS = [PATTERN * 4 + PATTERN[:3], list(range(3000, 3013)), [2000, 2001] * 6 + [2000]]
MAX_TOKENS = 30


def test_lookup_continues_the_latest_earlier_occurrence() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert lookup(tokens, 3, ngram_max=3, ngram_min=1) == [7, 8, 1]  # the later of two
    assert lookup(tokens, 9, ngram_max=3, ngram_min=1) == [7, 8, 1, 2, 3]  # to the end
    assert lookup([5, 6, 7], 4, ngram_max=2, ngram_min=1) == []  # nothing recurs
    assert lookup([4, 5, 9, 5], 2, ngram_max=3, ngram_min=1) == [9, 5]  # a shorter n-gram


def test_accept_keeps_the_agreeing_prefix_and_the_targets_next_token() -> None:
    assert accept([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]  # all drafts and a bonus token
    assert accept([4, 9, 6, 7], [4, 5, 6]) == [4, 9]  # the target's token replaces a miss
    assert accept([8, 5, 6, 7], [4, 5, 6]) == [8]  # nothing kept: a plain step


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "medusa"}, "method 'medusa' is unknown"),
        ({"num_tokens": 0}, "num_tokens=0"),
        ({"ngram_min": 3, "ngram_max": 2}, "ngram_min=3"),
        ({"min_acceptance": 1.5}, "min_acceptance=1.5"),
    ],
)
def test_bad_settings_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        SpeculativeConfig(**fields)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> list[list[int]]:
    return greedy_references(tiny_llama_dir, PROMPTS, MAX_TOKENS)


def generate(
    runtime: TextGenerationRuntime, spec: SpeculativeConfig | None, draft: Any = None
) -> tuple[list[list[int]], GenerationEngine]:
    """Every prompt at once (greedy, no end-of-sequence), through an engine with `spec`."""
    config = EngineConfig(block_size=4, kv_cache_bytes=2**20, max_seqs=4, speculative=spec)
    engine = GenerationEngine(runtime.model, runtime.tokenizer, config, draft=draft)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

    async def run() -> list[list[int]]:
        results = await asyncio.gather(*(collect(engine, p, params) for p in PROMPTS))
        return [tokens_of(events) for events in results]

    engine.start()
    try:
        return asyncio.run(run()), engine
    finally:
        engine.close()


def test_prompt_lookup_gives_plain_greedy_output(
    runtime: TextGenerationRuntime, reference: list[list[int]]
) -> None:
    # One-token matches and no pause: the random model's drafts are wrong, verify anyway.
    spec = SpeculativeConfig(method="prompt-lookup", num_tokens=4, ngram_min=1, min_acceptance=0)
    got, engine = generate(runtime, spec)
    assert got == reference  # transformers' generate(), token for token
    stats = engine.stats()
    assert stats.drafted_tokens > 0  # the repeating prompts were looked up
    assert 0 <= stats.accepted_tokens <= stats.drafted_tokens
    assert stats.free_blocks == stats.total_blocks  # drafts' blocks returned with the rest


def test_a_draft_model_gives_plain_greedy_output(
    runtime: TextGenerationRuntime, reference: list[list[int]], tiny_llama_dir: Path
) -> None:
    """The target itself as its draft: every draft is accepted, so the bookkeeping of the
    draft's own cache (catch-up, settle) is what decides the tokens; then a lossy draft."""
    spec = SpeculativeConfig(method="draft", num_tokens=3)
    got, engine = generate(runtime, spec, draft=runtime.model)
    assert got == reference
    stats = engine.stats()
    assert stats.accepted_tokens == stats.drafted_tokens > 0
    lossy = TextGenerationRuntime.load(tiny_llama_dir, weights="int8")
    got, engine = generate(runtime, spec, draft=lossy.model)
    assert got == reference
    assert engine.stats().drafted_tokens > engine.stats().accepted_tokens


def test_sampled_requests_and_large_batches_do_not_speculate(
    runtime: TextGenerationRuntime,
) -> None:
    spec = SpeculativeConfig(method="draft", num_tokens=3, max_rows=2)
    _, engine = generate(runtime, spec, draft=runtime.model)  # 3 rows > max_rows at first
    crowded = engine.stats().drafted_tokens
    _, engine = generate(runtime, SpeculativeConfig(method="draft", num_tokens=3), runtime.model)
    assert crowded < engine.stats().drafted_tokens


def test_a_sequence_whose_drafts_fail_pauses_drafting(runtime: TextGenerationRuntime) -> None:
    """The random model rejects looked-up drafts: with the default pause, fewer are made."""
    eager = SpeculativeConfig(method="prompt-lookup", ngram_min=1, min_acceptance=0)
    _, engine = generate(runtime, eager)
    paused = SpeculativeConfig(method="prompt-lookup", ngram_min=1, pause_tokens=64)
    _, careful = generate(runtime, paused)
    assert 0 < careful.stats().drafted_tokens < engine.stats().drafted_tokens


def test_a_draft_model_must_share_the_vocabulary(runtime: TextGenerationRuntime) -> None:
    import dataclasses

    other = dataclasses.replace(
        runtime.model, shape=dataclasses.replace(runtime.model.shape, vocab=7)
    )
    config = EngineConfig(speculative=SpeculativeConfig(method="draft"))
    with pytest.raises(InvalidArgument, match="vocabulary"):
        GenerationEngine(runtime.model, runtime.tokenizer, config, draft=other)
    with pytest.raises(InvalidArgument, match="needs a draft model"):
        GenerationEngine(runtime.model, runtime.tokenizer, config)


@pytest.mark.skipif(not qgemv.available(), reason="no AVX-512 VNNI or compiler")
def test_verification_matches_plain_decoding_with_the_default_weights(
    tiny_llama_dir: Path,
) -> None:
    """bf16 activations, int8 few-row matmuls: verification runs each drafted token as a
    decode row of its own through the C layers, so the output is plain decoding's, token for
    token, where model.forward over the drafts could differ at near ties."""
    quantized = TextGenerationRuntime.load(tiny_llama_dir, weights="bf16+int4")
    plain, _ = generate(quantized, None)
    assert isinstance(quantized.model.fused, fused.FusedLayers)  # decode steps took C layers
    spec = SpeculativeConfig(method="prompt-lookup", num_tokens=4, ngram_min=1, min_acceptance=0)
    looked_up, engine = generate(quantized, spec)
    assert looked_up == plain
    assert engine.stats().drafted_tokens > 0
    drafted, engine = generate(
        quantized, SpeculativeConfig(method="draft", num_tokens=3), draft=quantized.model
    )
    assert drafted == plain
    assert 0 < engine.stats().accepted_tokens <= engine.stats().drafted_tokens
