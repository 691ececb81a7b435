"""Speculative decoding for greedy requests: draft k tokens cheaply, verify them in one forward.

A decode step of few rows reads every weight to produce one token per row; fed k drafted
tokens as well, the same forward (now T = k + 1 positions per row) scores all of them. The
target's greedy token at each position is compared with the draft; the longest agreeing
prefix is kept, plus the target's own token after it. Every kept token is the target's
argmax given the tokens before it, so the output is that of plain greedy decoding, provided
the verification's arithmetic gives the logits a decode step would: it does, bit for bit,
where the C layers (fused.py) serve it, each drafted token a decode row of its own
(decode.forward_rows; the defaults on a CPU with AVX-512 VNNI); elsewhere the verification
is one model.forward over the k + 1 positions, exact in fp32, and bf16 can differ at near
ties, as any change of batch shape can.

Drafts come from one of two proposers:

- `prompt-lookup` (Saxena 2023; vLLM's "ngram"): the last n tokens (n from `ngram_max` down
  to `ngram_min`) are looked up earlier in the sequence (prompt and output), and the tokens
  that followed their latest earlier occurrence are the draft. Free; pays on repetitive
  outputs (summaries, edits, code, extraction) and costs nothing when nothing matches.
- `draft` (Leviathan et al. 2023; Chen et al. 2023): a cheaper model with the same
  tokenizer, usually a quantized variant of the same checkpoint, decodes k tokens greedily.
  It keeps its own KV pool with the target's geometry, so it indexes it with the target's
  block tables; `DraftModel.propose` catches its cache up on the tokens it has not seen.

Only greedy rows without penalties, logprobs or a grammar speculate, and only while the
decode batch has at most `max_rows` sequences: a larger batch is compute-bound, where the k
extra positions per row cost nearly k times a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slimserve.errors import InvalidArgument
from slimserve.runtimes.llm.blocks import BlockAllocator
from slimserve.runtimes.llm.decode import forward_step
from slimserve.runtimes.llm.model import LlamaModel, new_kv_pool
from slimserve.runtimes.llm.sequence import Row, Seq, make_batch

METHODS = ("prompt-lookup", "draft")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str = "prompt-lookup"
    num_tokens: int = 4  # drafted tokens per step (k)
    ngram_max: int = 3  # prompt-lookup: the longest suffix looked up
    ngram_min: int = 2  # one-token matches recur everywhere and are mostly wrong
    max_rows: int = 4  # speculate while at most this many sequences decode together
    # A sequence whose drafts are accepted less than this (moving average) pauses drafting
    # for `pause_tokens` output tokens: a verification costs more than a plain step.
    min_acceptance: float = 0.5
    pause_tokens: int = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgument(
                f"speculative method {self.method!r} is unknown; use {' or '.join(METHODS)}"
            )
        if not 0.0 <= self.min_acceptance <= 1.0:
            raise InvalidArgument(f"speculative min_acceptance={self.min_acceptance}; use 0 to 1")
        if not 1 <= self.num_tokens <= 16:
            raise InvalidArgument(f"speculative num_tokens={self.num_tokens}; use 1 to 16")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise InvalidArgument(
                f"speculative ngram_min={self.ngram_min}, ngram_max={self.ngram_max}; "
                "use 1 <= ngram_min <= ngram_max"
            )


def speculates(seq: Seq) -> bool:
    """Rows whose next tokens are the argmax alone: no sampling, penalties (they depend on
    the tokens before), logprobs or grammar."""
    params = seq.params
    plain = not params.penalized and params.repetition_penalty == 1.0
    return params.greedy and plain and params.logprobs is None and seq.constraint is None


def lookup(tokens: Sequence[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix
    (ngram_max down to ngram_min tokens) of `tokens`; [] when none recurs."""
    size = len(tokens)
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        suffix = list(tokens[size - n :])
        first = suffix[0]
        # Latest occurrence first: recent context predicts the continuation best.
        for start in range(size - n - 1, -1, -1):
            if tokens[start] == first and list(tokens[start : start + n]) == suffix:
                return list(tokens[start + n : start + n + k])
    return []


def accept(greedy: Sequence[int], draft: Sequence[int]) -> list[int]:
    """The tokens a verified step emits: the target's greedy tokens at each of the k + 1
    positions, up to and including the first that disagrees with the draft."""
    kept = 0
    while kept < len(draft) and greedy[kept] == draft[kept]:
        kept += 1
    return list(greedy[: kept + 1])


class DraftModel:
    """A cheaper model proposing tokens; its KV pool mirrors the target's block geometry."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.pool = new_kv_pool(model.shape, num_blocks, block_size)
        self._seen: dict[int, int] = {}  # seq_id -> leading tokens whose draft K/V is cached

    def nbytes(self) -> int:
        return self.model.nbytes() + self.pool.numel() * self.pool.element_size()

    def forget(self, seq: Seq) -> None:
        """The sequence finished or lost its blocks: its draft cache is gone with them."""
        self._seen.pop(seq.seq_id, None)

    @torch.inference_mode()
    def propose(self, seqs: Sequence[Seq], k: int) -> list[list[int]]:
        """k greedy draft tokens per sequence (its table must cover k more positions).

        The first forward catches the draft's cache up on the tokens it has not seen (the
        whole prompt the first time), the next k - 1 feed one draft token each."""
        rows = [
            Row(list(s.tokens), min(self._seen.get(s.seq_id, 0), len(s.tokens) - 1), s.table)
            for s in seqs
        ]
        drafts: list[list[int]] = [[] for _ in seqs]
        for step in range(k):
            logits = forward_step(self.model, self.pool, make_batch(rows, self.block_size))
            for row, draft, token in zip(rows, drafts, logits.argmax(dim=-1).tolist(), strict=True):
                row.computed = len(row.tokens)
                draft.append(token)
                if step < k - 1:
                    row.tokens.append(token)
        for seq, row in zip(seqs, rows, strict=True):
            self._seen[seq.seq_id] = row.computed  # trimmed by settle() after verification
        return drafts

    def settle(self, seq: Seq) -> None:
        """After verification: the draft cache holds the target's tokens up to the first
        rejected draft (positions past it hold rejected drafts, rewritten later)."""
        if seq.seq_id in self._seen:
            self._seen[seq.seq_id] = min(self._seen[seq.seq_id], seq.computed)


class Speculator:
    """Drafts for the speculating rows of a decode batch, blocks for them included."""

    def __init__(
        self,
        config: SpeculativeConfig,
        blocks: BlockAllocator,
        max_context: int,
        draft: DraftModel | None = None,
    ) -> None:
        if config.method == "draft" and draft is None:
            raise InvalidArgument("speculative method 'draft' needs a draft model; load one")
        self.config, self.blocks, self.max_context, self.draft = config, blocks, max_context, draft
        # seq_id -> (moving acceptance rate, output length before which drafting pauses)
        self._record: dict[int, tuple[float, int]] = {}

    def drafts(self, seqs: Sequence[Seq]) -> dict[int, list[int]]:
        """seq_id -> drafted tokens, for the rows that speculate this step (none when the
        batch is larger than max_rows, or the pool has no block for the drafts)."""
        if len(seqs) > self.config.max_rows:
            return {}
        room = {s.seq_id: self._room(s) for s in seqs if speculates(s)}
        chosen = [s for s in seqs if room.get(s.seq_id, 0) > 0 and self._reserve(s, room[s.seq_id])]
        if not chosen:
            return {}
        if self.draft is not None:
            k = min(room[s.seq_id] for s in chosen)
            return dict(zip((s.seq_id for s in chosen), self.draft.propose(chosen, k), strict=True))
        c = self.config
        found = {
            s.seq_id: lookup(s.tokens, room[s.seq_id], c.ngram_max, c.ngram_min) for s in chosen
        }
        return {seq_id: draft for seq_id, draft in found.items() if draft}

    def _room(self, seq: Seq) -> int:
        """Drafts worth making: no more than the tokens the request may still take (the
        verified step adds one of its own) or the context holds."""
        left = seq.params.max_tokens - len(seq.output_ids) - 1
        if len(seq.output_ids) < self._record.get(seq.seq_id, (1.0, 0))[1]:
            return 0  # paused: its drafts were mostly wrong
        return max(0, min(self.config.num_tokens, left, self.max_context - len(seq.tokens)))

    def _reserve(self, seq: Seq, k: int) -> bool:
        """Blocks for k more positions, if free ones exist (the scheduler never counted them)."""
        missing = -(-(len(seq.tokens) + k) // self.blocks.block_size) - len(seq.table)
        if missing > self.blocks.free_count():
            return False
        seq.table += self.blocks.allocate(max(0, missing))
        return True

    def forget(self, seq: Seq) -> None:
        self._record.pop(seq.seq_id, None)
        if self.draft is not None:
            self.draft.forget(seq)

    def settle(self, seq: Seq, drafted: int, accepted: int) -> None:
        """After verification: track the acceptance rate (pausing a sequence whose drafts
        keep failing) and trim the draft model's cache to what the target kept."""
        rate, _ = self._record.get(seq.seq_id, (1.0, 0))
        rate = 0.5 * rate + 0.5 * accepted / max(drafted, 1)
        pause = 0
        if rate < self.config.min_acceptance:  # try again later, with a clean slate
            rate, pause = 1.0, len(seq.output_ids) + self.config.pause_tokens
        self._record[seq.seq_id] = (rate, pause)
        if self.draft is not None:
            self.draft.settle(seq)
