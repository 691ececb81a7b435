"""Shared helpers: run requests through an engine, and the reference from generate()."""

from __future__ import annotations

import asyncio
from typing import Any

from slimserve.runtimes.llm import SamplingParams, TokenEvent
from slimserve.runtimes.llm.engine import GenerationEngine


async def collect(
    engine: GenerationEngine, prompt: list[int], params: SamplingParams, **kwargs: Any
) -> list[TokenEvent]:
    return [event async for event in engine.submit(prompt, params, **kwargs)]


def tokens_of(events: list[TokenEvent], index: int = 0) -> list[int]:
    return [t for e in events if e.index == index for t in e.token_ids]


def text_of(events: list[TokenEvent], index: int = 0) -> str:
    return "".join(e.text for e in events if e.index == index)


def greedy_reference(hf_model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    import torch

    out = hf_model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt) :].tolist()


def greedy_references(folder: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """generate()'s greedy tokens for each prompt, from the transformers model in `folder`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    return [greedy_reference(hf, p, max_tokens) for p in prompts]


def run(coro: Any) -> Any:
    return asyncio.run(coro)
