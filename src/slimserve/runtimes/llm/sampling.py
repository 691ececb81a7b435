"""Pick the next token of every row of a batch from its logits.

Greedy rows (temperature 0) take the argmax in one call for the whole batch. Sampled rows are
scaled, filtered (top_k, min_p, nucleus top_p) and softmaxed together; only the final draw
runs per row, with the row's own generator, so a seeded request draws the same tokens whatever
else shares its batch. Grammar masks (constrained decoding), penalties (OpenAI's presence and
frequency, and the repetition penalty) and logprobs cost only the rows asking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from slimserve.runtimes.llm.grammar import Constraint, mask_rows
from slimserve.runtimes.llm.params import SamplingParams, TokenLogprob


class Row(Protocol):
    @property
    def params(self) -> SamplingParams: ...
    @property
    def generator(self) -> torch.Generator | None: ...
    @property
    def output_ids(self) -> list[int]: ...
    @property
    def tokens(self) -> list[int]: ...  # prompt and output so far
    @property
    def constraint(self) -> Constraint | None: ...


@torch.inference_mode()
def sample(
    logits: torch.Tensor, rows: Sequence[Row]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Next token per row of `logits` (B, V), and its logprobs where the row asked."""
    constrained = [(i, row.constraint) for i, row in enumerate(rows) if row.constraint]
    if constrained:
        mask_rows(logits, constrained)  # tokens the grammar forbids: -inf
    logits = _repeat_penalize(logits, rows)
    logits = _penalize(logits, rows)
    chosen = logits.argmax(dim=-1)  # (B,)
    drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
    if drawn:
        chosen[drawn] = _draw(logits[drawn], [rows[i] for i in drawn])
    tokens = chosen.tolist()
    return tokens, _logprobs(logits, rows, tokens)


def _penalize(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """logits - presence * [token seen] - frequency * count(token), for penalized rows."""
    penalized = [i for i, row in enumerate(rows) if row.params.penalized and row.output_ids]
    if not penalized:
        return logits
    logits = logits.clone()
    for i in penalized:  # few rows; each a vectorized bincount over its own outputs
        params = rows[i].params
        counts = torch.bincount(torch.tensor(rows[i].output_ids), minlength=logits.shape[1])
        counts = counts[: logits.shape[1]].to(logits.dtype)
        logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def _repeat_penalize(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Tokens seen in the prompt or output: positive logits / p, negative ones * p."""
    rows_p = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not rows_p:
        return logits
    logits = logits.clone()
    for i in rows_p:
        penalty = rows[i].params.repetition_penalty
        seen = torch.tensor(sorted(set(rows[i].tokens)), dtype=torch.int64)
        seen = seen[seen < logits.shape[1]]
        values = logits[i, seen]
        logits[i, seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def _draw(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Temperature, top_k and min_p, top_p, then one multinomial draw per row."""
    temperature = torch.tensor([row.params.temperature for row in rows])[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)  # (R, V)
    if any(row.params.filtered for row in rows):
        probs = _top_k_min_p(probs, rows)
    top_p = torch.tensor([row.params.top_p for row in rows])[:, None]
    if bool((top_p < 1.0).any()):
        probs = _nucleus(probs, top_p)
    draws = [torch.multinomial(probs[i], 1, generator=row.generator) for i, row in enumerate(rows)]
    return torch.cat(draws)


def _top_k_min_p(probs: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Zero the tokens below each row's k-th largest probability (top_k > 0) and below
    min_p times its largest (min_p > 0); the most likely token always stays."""
    vocab = probs.shape[1]
    ks = torch.tensor([row.params.top_k if row.params.top_k > 0 else vocab for row in rows])
    kth = probs.sort(dim=-1, descending=True).values.gather(1, (ks.clamp(max=vocab) - 1)[:, None])
    min_p = torch.tensor([row.params.min_p for row in rows])[:, None]
    floor = torch.maximum(kth, min_p * probs.max(dim=-1, keepdim=True).values)
    kept = torch.where(probs >= floor, probs, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens outside the smallest set whose mass reaches top_p (per row)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0  # the top token always stays (mass_before 0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def _logprobs(
    logits: torch.Tensor, rows: Sequence[Row], tokens: list[int]
) -> list[TokenLogprob | None]:
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(rows)
    if not wanted:
        return result
    logp = torch.log_softmax(logits[wanted].float(), dim=-1)  # (W, V)
    for j, i in enumerate(wanted):
        k = rows[i].params.logprobs or 0
        values, ids = logp[j].topk(k) if k else (logp[j][:0], logp[j][:0].long())
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        result[i] = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), top)
    return result
