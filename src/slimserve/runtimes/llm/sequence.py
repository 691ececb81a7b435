"""Requests, their sequences (one per choice), and the padded batches built from them."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from slimserve.runtimes.llm.blocks import SCRATCH_BLOCK, block_keys
from slimserve.runtimes.llm.detok import TextStream
from slimserve.runtimes.llm.grammar import Constraint
from slimserve.runtimes.llm.model import Batch
from slimserve.runtimes.llm.params import SamplingParams, TokenLogprob

_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One submit: its choices, where its events go, and whether the caller still listens."""

    prompt: list[int]
    params: SamplingParams
    deadline: float | None  # engine clock seconds
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    seqs: list[Seq] = field(default_factory=list)
    cancelled: bool = False  # set from the caller's thread; read by the engine thread
    cached_tokens: int = 0

    def done(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.seqs)


@dataclass(eq=False)
class Seq:
    """One choice being generated: its tokens, KV blocks and text."""

    request: Request
    index: int
    tokens: list[int]  # prompt + output so far
    text: TextStream
    generator: torch.Generator | None
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)  # KV block ids, in position order
    computed: int = 0  # leading tokens whose K/V is in the cache
    keys: list[int] = field(default_factory=list)  # prefix keys of the full blocks
    finish_reason: str | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    constraint: Constraint | None = None  # the grammar this choice's tokens must follow

    @property
    def params(self) -> SamplingParams:
        return self.request.params


def new_seqs(
    request: Request, tokenizer: Any, constrain: Callable[[], Constraint] | None = None
) -> list[Seq]:
    """The request's n choices; seeded choices get generators seeded seed, seed + 1, ...;
    each gets its own grammar state from `constrain` where given."""
    params = request.params
    return [
        Seq(
            request,
            i,
            list(request.prompt),
            TextStream(tokenizer, params.stop),
            _gen(params, i),
            constraint=constrain() if constrain is not None else None,
        )
        for i in range(params.n)
    ]


def _gen(params: SamplingParams, index: int) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is not None:
        generator.manual_seed(params.seed + index)
    else:
        generator.seed()
    return generator


def full_block_keys(seq: Seq, block_size: int) -> list[int]:
    """Extend the sequence's prefix keys over its newly completed blocks (computed tokens)."""
    done = len(seq.keys) * block_size
    parent = seq.keys[-1] if seq.keys else None
    seq.keys += block_keys(seq.tokens[done : seq.computed], block_size, parent)
    return seq.keys


class Pending(Protocol):
    """What a forward needs of a row: its tokens, how many have K/V cached, its blocks."""

    @property
    def tokens(self) -> list[int]: ...
    @property
    def computed(self) -> int: ...
    @property
    def table(self) -> list[int]: ...


@dataclass
class Row:
    """A row that is not a sequence as it stands: a sequence with drafted tokens appended,
    or a draft model's view of it (speculate.py)."""

    tokens: list[int]
    computed: int
    table: list[int]


def make_batch(seqs: Sequence[Pending], block_size: int) -> Batch:
    """Pad the sequences' uncomputed tokens into one forward's inputs (see model.Batch)."""
    news = [len(s.tokens) - s.computed for s in seqs]
    width, depth = max(news), max(len(s.table) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.int64)
    positions = torch.zeros(len(seqs), width, dtype=torch.int64)
    tables = torch.full((len(seqs), depth), SCRATCH_BLOCK, dtype=torch.int64)
    for row, (seq, new) in enumerate(zip(seqs, news, strict=True)):
        tokens[row, :new] = torch.tensor(seq.tokens[seq.computed :])
        positions[row, :new] = torch.arange(seq.computed, seq.computed + new)
        tables[row, : len(seq.table)] = torch.tensor(seq.table)
    # Each position p of a row lives in block tables[row, p // bs] at offset p % bs; padding
    # positions (0) of row r would overwrite its first token, so they go to the scratch block.
    real = torch.arange(width)[None, :] < torch.tensor(news)[:, None]
    blocks = tables.gather(1, positions // block_size)
    slots = torch.where(real, blocks * block_size + positions % block_size, SCRATCH_BLOCK)
    last = torch.tensor(news) - 1
    return Batch(tokens, positions, slots.view(-1), tables, last)
