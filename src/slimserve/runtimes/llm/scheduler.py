"""The scheduling decision of one engine iteration, as a pure function (no torch, no clock).

Every iteration the engine asks `schedule` which waiting sequences to prefill (admit), which
running ones to decode, and which to preempt, given the free KV blocks. The policy:

- Continuous batching: waiting sequences are admitted at every iteration while the running
  batch has room (`max_seqs`), the KV pool has the blocks for their whole prompt, and the
  iteration's prefill budget (`max_prefill_tokens`) allows; they decode from the next one.
  FIFO: admission stops at the first sequence that does not fit, so none is starved by
  later, smaller ones (the first one is always admitted alone if the pool can hold it, even
  over the prefill budget, so a long prompt still gets in).
- Prefill first (as vLLM's default scheduler): an iteration that admits prompts does not
  decode the running sequences, for at most `prefill_first` iterations in a row (the engine
  counts them: `streak`), so that a wave of simultaneous requests all get their first token
  before the running ones step again. The running ones wait the same prefills either way (an
  iteration runs its prefill before its decode step); what is saved is the decode steps of a
  partial batch between the wave's prefills, which every prompt of the wave but the first
  ones waited for, and which a full batch does in one step afterwards. The bound keeps a
  steady stream of arrivals from starving decode.
- Static batching (`continuous=False`, the baseline): admit only when nothing is running.
- Preemption by recompute: a running sequence that needs one more block when none is free
  takes it from the most recently admitted running sequences, which are preempted (their
  blocks freed, their tokens so far queued at the front to be prefilled again later). The
  oldest sequence is never preempted for a younger one, so the batch always progresses.
  Nothing is admitted in an iteration that preempts.
- Refusal (elsewhere): the engine refuses at submit a prompt that can never fit (longer than
  the context or the whole pool) and a request when the waiting queue is full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerState:
    """The batching mode; the engine's sequences are passed separately."""

    continuous: bool = True


@dataclass(frozen=True, slots=True)
class Limits:
    max_seqs: int = 32  # sequences decoded together at most
    max_prefill_tokens: int = 4096  # prompt tokens computed in one iteration at most
    prefill_first: int = 4  # iterations in a row that may admit without decoding; 0: never


@dataclass(frozen=True, slots=True)
class WaitingSeq:
    seq_id: int
    prefill_tokens: int  # tokens to compute (prompt minus cached prefix)
    blocks_needed: int  # free-pool blocks its admission takes


@dataclass(frozen=True, slots=True)
class RunningSeq:
    seq_id: int
    blocks_needed: int  # 0, or 1 when the next token starts a new block
    blocks_freeable: int  # blocks its preemption would return (those not shared)


@dataclass(frozen=True, slots=True)
class Decision:
    prefill: tuple[int, ...] = ()  # waiting sequences admitted now, in order
    decode: tuple[int, ...] = ()  # running sequences stepped now
    preempt: tuple[int, ...] = ()  # running sequences sent back to the waiting queue


def schedule(
    state: SchedulerState,
    waiting: Sequence[WaitingSeq],
    running: Sequence[RunningSeq],
    free_blocks: int,
    limits: Limits,
    streak: int = 0,
) -> Decision:
    """Decide one iteration. `running` is ordered oldest first, `waiting` in queue order;
    `streak`: the iterations just before this one that admitted without decoding."""
    decode, preempt, free_blocks = _grow_running(running, free_blocks)
    if preempt or (running and not state.continuous):
        return Decision(decode=decode, preempt=preempt)
    prefill = _admit(waiting, len(decode), free_blocks, limits)
    if prefill and streak < limits.prefill_first:  # the running ones keep their blocks' room
        return Decision(prefill=prefill)
    return Decision(prefill=prefill, decode=decode, preempt=())


def _grow_running(
    running: Sequence[RunningSeq], free_blocks: int
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Give each running sequence its next block, preempting the youngest when short."""
    kept = list(running)
    preempt: list[int] = []
    index = 0
    while index < len(kept):
        seq = kept[index]
        while seq.blocks_needed > free_blocks and kept[-1] is not seq:
            victim = kept.pop()
            preempt.append(victim.seq_id)
            free_blocks += victim.blocks_freeable
        if seq.blocks_needed > free_blocks:  # alone and still short: it waits too
            kept.pop()
            preempt.append(seq.seq_id)
            free_blocks += seq.blocks_freeable
            break
        free_blocks -= seq.blocks_needed
        index += 1
    return tuple(seq.seq_id for seq in kept), tuple(preempt), free_blocks


def _admit(
    waiting: Sequence[WaitingSeq], running: int, free_blocks: int, limits: Limits
) -> tuple[int, ...]:
    """FIFO admission while sequences, blocks and the prefill budget allow."""
    admitted: list[int] = []
    budget = limits.max_prefill_tokens
    for seq in waiting:
        if running + len(admitted) >= limits.max_seqs or seq.blocks_needed > free_blocks:
            break
        if admitted and seq.prefill_tokens > budget:
            break
        admitted.append(seq.seq_id)
        free_blocks -= seq.blocks_needed
        budget -= seq.prefill_tokens
    return tuple(admitted)
