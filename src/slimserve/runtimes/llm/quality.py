"""Perplexity of a text under our forward: the quality measure for LM variants (int8)."""

from __future__ import annotations

import math

import torch

from slimserve.runtimes.llm.model import Batch, LlamaModel, forward, new_kv_pool

# A held-out paragraph (written for this project, public domain) for perplexity checks.
HELD_OUT_TEXT = (
    "The river rose slowly through the spring, and the people of the valley moved their "
    "animals to the high pastures as their grandparents had done. In the evenings the old "
    "miller told the children how the water had once reached the church steps, and how the "
    "whole village had rowed to market in borrowed boats. Nobody quite believed him, but "
    "everyone listened, because the story was better each time he told it. When summer came "
    "the fields were green again, the bridge was mended, and the boats went back to the barn."
)


@torch.inference_mode()
def text_logits(model: LlamaModel, tokens: list[int], block_size: int = 16) -> torch.Tensor:
    """(T - 1, V) logits predicting tokens[1:] from the tokens before each."""
    count = -(-len(tokens) // block_size)
    pool = new_kv_pool(model.shape, count + 1, block_size)  # block 0: scratch
    positions = torch.arange(len(tokens))
    batch = Batch(
        tokens=torch.tensor([tokens]),
        positions=positions[None],
        slots=positions + block_size,  # blocks 1..count, in order
        block_tables=torch.arange(1, count + 1)[None],
        last=torch.tensor([len(tokens) - 1]),
    )
    return forward(model, pool, batch, all_logits=True)[0, :-1]


def perplexity(model: LlamaModel, tokens: list[int], block_size: int = 16) -> float:
    """exp(mean negative log-likelihood) of tokens[1:] given the tokens before each."""
    logits = text_logits(model, tokens, block_size)
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:]))
    return math.exp(float(nll))
