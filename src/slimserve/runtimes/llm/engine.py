"""The generation engine: continuous batching over a paged KV cache, in one worker thread.

A transport calls, from its event loop:

    stream = engine.submit(prompt_ids, SamplingParams(max_tokens=64), deadline_s=30.0)
    async for event in stream:          # TokenEvent: index, token_ids, text, finish_reason,
        send(event)                     # usage (on the very last event), logprobs
    # or: async with stream: ...; leaving early (break, client gone, task cancelled) cancels

`submit` validates and queues at once (bad input and a full queue raise before any event), so
a transport can answer with an error status before it starts streaming.

The worker thread runs iterations: schedule (a pure decision, scheduler.py), preempt, prefill
the admitted sequences in one forward, decode one token for every running sequence in one
forward, sample, emit, free the finished. Events cross to the caller's loop with
`call_soon_threadsafe`; cancellation and deadlines are checked at every iteration.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from slimserve.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from slimserve.runtimes.llm.blocks import BlockAllocator, block_keys
from slimserve.runtimes.llm.decode import forward_rows, forward_step, supported
from slimserve.runtimes.llm.engine_config import (
    EngineConfig,
    EngineStats,
    RemoteModel,
    usable_cores,
)
from slimserve.runtimes.llm.grammar import Grammars
from slimserve.runtimes.llm.int4mm import choose_paths
from slimserve.runtimes.llm.model import (
    Batch,
    LlamaModel,
    forward,
    kv_bytes_per_token,
    new_kv_pool,
)
from slimserve.runtimes.llm.params import (
    FINISH_LENGTH,
    FINISH_STOP,
    SamplingParams,
    TokenEvent,
    Usage,
)
from slimserve.runtimes.llm.sampling import sample
from slimserve.runtimes.llm.scheduler import (
    Limits,
    RunningSeq,
    SchedulerState,
    WaitingSeq,
    schedule,
)
from slimserve.runtimes.llm.sequence import (
    Request,
    Row,
    Seq,
    full_block_keys,
    make_batch,
    new_seqs,
)
from slimserve.runtimes.llm.speculate import DraftModel, Speculator, accept
from slimserve.runtimes.llm.stream import END, GenerationStream

# The config, stats and remote-model interface live in engine_config.py; callers take them
# from here, with the engine.
__all__ = ["EngineConfig", "EngineStats", "GenerationEngine", "RemoteModel", "usable_cores"]

log = logging.getLogger(__name__)


class GenerationEngine:
    """Generates tokens for many requests at once; see the module docstring for the API."""

    def __init__(
        self,
        model: LlamaModel | RemoteModel,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        eos_token_ids: Sequence[int] = (),
        clock: Callable[[], float] = time.monotonic,
        draft: LlamaModel | None = None,
    ) -> None:
        """`draft`: the model proposing tokens for `speculative` method `draft` (same
        tokenizer; usually a quantized variant of `model`)."""
        self.model, self.tokenizer = model, tokenizer
        self.config = config or EngineConfig()
        self.eos = frozenset(eos_token_ids)
        self.clock = clock
        num_blocks = self.config.kv_cache_bytes // self.block_bytes()
        self.blocks = BlockAllocator(num_blocks, self.config.block_size, self.config.prefix_caching)
        self.pool: torch.Tensor | None = None
        self._remote: RemoteModel | None = None
        self._forward: Callable[[Batch, bool], torch.Tensor]
        if isinstance(model, LlamaModel):
            self.pool = new_kv_pool(model.shape, num_blocks, self.config.block_size)
            # decode steps of supported models go through decode.py's lean path
            self._forward = functools.partial(_local_forward, model, self.pool, supported(model))
        else:
            if self.config.speculative is not None:
                raise InvalidArgument(
                    "speculative decoding does not run on a model-parallel group yet; drop "
                    "`speculative` or set pipeline_parallel and tensor_parallel to 1"
                )
            model.allocate(num_blocks, self.config.block_size)
            self._forward, self._remote = model.forward, model
        pool_tokens = self.blocks.capacity * self.config.block_size
        self.max_context = min(model.shape.max_positions, pool_tokens)
        config = self.config
        self._limits = Limits(config.max_seqs, config.max_prefill_tokens, config.prefill_first)
        self._state = SchedulerState(continuous=self.config.continuous)
        self._inbox: list[Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: deque[Seq] = deque()
        self._running: list[Seq] = []
        self._stopping = False
        self._streak = 0  # iterations in a row that admitted without decoding (scheduler.py)
        self._counts = dict.fromkeys(
            ("preemptions", "cached_tokens", "iterations", "drafted_tokens", "accepted_tokens"), 0
        )
        self._speculator = self._make_speculator(draft, num_blocks)
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Request, Any]]] = {}
        self._thread: threading.Thread | None = None
        self._grammars = Grammars(tokenizer)

    def _make_speculator(self, draft: LlamaModel | None, num_blocks: int) -> Speculator | None:
        spec = self.config.speculative
        if spec is None:
            return None
        if draft is not None and draft.shape.vocab != self.model.shape.vocab:
            raise InvalidArgument(
                f"the draft model's vocabulary ({draft.shape.vocab}) is not the target's "
                f"({self.model.shape.vocab}); a draft must share the tokenizer"
            )
        drafter = None
        if spec.method == "draft" and draft is not None:
            drafter = DraftModel(draft, num_blocks, self.config.block_size)
        return Speculator(spec, self.blocks, self.max_context, drafter)

    def nbytes(self) -> int:
        """Weights and KV pool, and a draft model's (a model-parallel group: its largest
        process's weights and KV pool)."""
        total = self.model.nbytes()
        if self.pool is not None:
            total += self.pool.numel() * self.pool.element_size()
        spec = self._speculator
        return total + (spec.draft.nbytes() if spec is not None and spec.draft else 0)

    def block_bytes(self) -> int:
        return kv_bytes_per_token(self.model.shape) * self.config.block_size

    # --- the caller's side (event loop thread) ---------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
            self._thread.start()
            if self.tokenizer is not None:  # ready before the first constrained request
                threading.Thread(target=self._grammars.prepare, daemon=True).start()

    def close(self) -> None:
        """Stop the worker; every unfinished request fails with UNAVAILABLE."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        deadline_s: float | None = None,
    ) -> GenerationStream:
        """Queue a request; its events come from the returned async iterator.

        `deadline_s`: seconds from now; past it the stream raises DeadlineExceeded (events
        already delivered stay delivered). Must be called from a running event loop.
        """
        params = params or SamplingParams()
        self._check_prompt(prompt_ids, params)
        if self._thread is None or self._stopping:
            raise Unavailable("the generation engine is not running; start() it first")
        loop = asyncio.get_running_loop()
        deadline = None if deadline_s is None else self.clock() + deadline_s
        request = Request(list(prompt_ids), params, deadline, loop, asyncio.Queue())
        grammar = params.grammar
        constrain = None if grammar is None else lambda: self._grammars.constraint(grammar)
        request.seqs = new_seqs(request, self.tokenizer, constrain)
        with self._lock:
            if len(self._inbox) + len(self._waiting) >= self.config.max_waiting:
                raise ResourceExhausted(
                    f"{self.config.max_waiting} requests are already waiting; retry later",
                    retry_after_s=1.0,
                )
            self._inbox.append(request)
        self._wake.set()
        return GenerationStream(request, self._wake)

    def _check_prompt(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty; send at least one token")
        vocab = self.model.shape.vocab
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidArgument(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context of {self.max_context} tokens; shorten the prompt or max_tokens"
            )

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=len(self._waiting) + len(self._inbox),
            running=len(self._running),
            free_blocks=self.blocks.free_count(),
            total_blocks=self.blocks.capacity,
            **self._counts,
        )

    # --- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.config.threads or usable_cores())
        if isinstance(self.model, LlamaModel):  # few-row paths timed with these threads
            choose_paths(self.model)
        while not self._stopping:
            self._take_inbox()
            self._drop_abandoned()
            self._deliver()
            if not self._waiting and not self._running:
                self._wake.wait()
                self._wake.clear()
                continue
            self.step()
            self._deliver()
        self._fail_all(Unavailable("the generation engine stopped; retry on another replica"))
        self._deliver()

    def _take_inbox(self) -> None:
        with self._lock:
            requests, self._inbox = self._inbox, []
        for request in requests:
            self._waiting.extend(request.seqs)

    def step(self) -> None:
        """One iteration: schedule, preempt, prefill, decode, emit, free."""
        self._counts["iterations"] += 1
        if self._remote is not None and not self._remote.healthy():
            reason = self._remote.dead_reason()  # a worker died between steps
            self._lose_kv(Unavailable(f"a model-parallel worker failed ({reason}); retry"))
            self._remote.restart(reason)
        decision = schedule(
            self._state,
            self._waiting_view(),
            self._running_view(),
            self.blocks.free_count(),
            self._limits,
            self._streak,
        )
        prefill_only = bool(decision.prefill and self._running and not decision.decode)
        self._streak = self._streak + 1 if prefill_only else 0
        by_id = {seq.seq_id: seq for seq in (*self._running, *self._waiting)}
        self._preempt([by_id[i] for i in decision.preempt])
        admitted = [by_id[i] for i in decision.prefill]
        decoding = [by_id[i] for i in decision.decode]
        for seq in admitted:
            self._waiting.remove(seq)
            self._allocate_prompt(seq)
        self._run_batch(admitted, self.prefill)
        self._deliver()  # first tokens now, not after the decode step below
        self._running += admitted
        # A lost model-parallel group fails every running sequence (_lose_kv).
        self._run_batch([s for s in decoding if s.finish_reason is None], self.decode_step)
        self._running = [seq for seq in self._running if seq.finish_reason is None]

    def _waiting_view(self) -> list[WaitingSeq]:
        head = itertools.islice(self._waiting, self.config.max_seqs)  # none beyond is admitted
        return [
            WaitingSeq(
                s.seq_id,
                len(s.tokens) - len(self.blocks.cached_prefix(s.tokens)) * self.config.block_size,
                self.blocks.blocks_to_admit(s.tokens),
            )
            for s in head
        ]

    def _running_view(self) -> list[RunningSeq]:
        size = self.config.block_size
        return [
            RunningSeq(  # speculation may have taken blocks ahead: none needed then
                s.seq_id,
                max(0, -(-len(s.tokens) // size) - len(s.table)),
                self.blocks.freeable(s.table),
            )
            for s in self._running
        ]

    def _preempt(self, seqs: list[Seq]) -> None:
        """Free their blocks; they recompute their tokens so far when admitted again."""
        for seq in seqs:
            self.free(seq)
            seq.computed, seq.keys = 0, []
            self._running.remove(seq)
            self._waiting.appendleft(seq)
            self._counts["preemptions"] += 1

    def _allocate_prompt(self, seq: Seq) -> None:
        seq.table, seq.computed = self.blocks.allocate_prompt(seq.tokens)
        if seq.output_ids == [] and seq.index == 0:
            seq.request.cached_tokens = seq.computed
        self._counts["cached_tokens"] += seq.computed
        # Register the full blocks now: a sequence admitted in the same forward that hits
        # them reads them after this one writes them (each layer writes before it attends).
        seq.keys = block_keys(seq.tokens, self.config.block_size)
        self.blocks.register(seq.table, seq.keys)

    def _run_batch(self, seqs: list[Seq], run: Callable[[list[Seq]], None]) -> None:
        """A failed batch fails each of its requests, never the engine."""
        if not seqs:
            return
        try:
            run(seqs)
        except Exception as error:
            log.exception("generation batch failed")
            for seq in seqs:
                self.blocks.unregister(seq.table)  # their K/V may be half written
                self._fail(seq.request, error)
            if self._remote is not None and isinstance(error, Unavailable):
                self._lose_kv(error)

    def _lose_kv(self, error: Unavailable) -> None:
        """The remote model's KV pools are gone (its processes restart empty): fail every
        sequence holding blocks and forget the prefix cache. Waiting ones hold none: kept."""
        for request in {seq.request for seq in self._running}:
            self._fail(request, error)
        self.blocks = BlockAllocator(
            self.blocks.num_blocks, self.config.block_size, self.config.prefix_caching
        )

    def prefill(self, seqs: list[Seq]) -> None:
        """Compute the K/V of the admitted sequences' uncached tokens; sample the next token."""
        self._forward_and_sample(seqs)

    def decode_step(self, seqs: list[Seq]) -> None:
        """One token for every running sequence: grow block tables, forward, sample."""
        for seq in seqs:
            missing = -(-len(seq.tokens) // self.config.block_size) - len(seq.table)
            seq.table += self.blocks.allocate(max(0, missing))
        drafts = self._speculator.drafts(seqs) if self._speculator is not None else {}
        if drafts:
            self._verify(seqs, drafts)
        else:
            self._forward_and_sample(seqs)

    def _verify(self, seqs: list[Seq], drafts: dict[int, list[int]]) -> None:
        """One forward over each row's new token and its drafts; each row keeps the tokens
        speculate.accept says (plain rows: their one sampled token)."""
        rows = [Row(s.tokens + drafts.get(s.seq_id, []), s.computed, s.table) for s in seqs]
        logits = self._forward(make_batch(rows, self.config.block_size), True)
        first = [len(s.tokens) - s.computed - 1 for s in seqs]  # the new token's offset
        tokens, logprobs = sample(logits[torch.arange(len(seqs)), first], seqs)
        greedy = logits.argmax(dim=-1).tolist()  # (B, T)
        for i, seq in enumerate(seqs):
            draft = drafts.get(seq.seq_id, [])
            verified = greedy[i][first[i] + 1 : first[i] + 1 + len(draft)]
            kept = accept([tokens[i], *verified], draft) if draft else [tokens[i]]
            self._counts["drafted_tokens"] += len(draft)
            self._counts["accepted_tokens"] += len(kept) - 1
            for token in kept:
                seq.computed = len(seq.tokens)
                self._register_full(seq)
                self._append(seq, token, logprobs[i])
                if seq.finish_reason is not None:
                    break
            if draft and self._speculator is not None and seq.finish_reason is None:
                self._speculator.settle(seq, len(draft), len(kept) - 1)

    def _forward_and_sample(self, seqs: list[Seq]) -> None:
        logits = self._forward(make_batch(seqs, self.config.block_size), False)
        tokens, logprobs = sample(logits, seqs)
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            seq.computed = len(seq.tokens)
            self._register_full(seq)
            self._append(seq, token, logprob)

    def _register_full(self, seq: Seq) -> None:
        if self.config.prefix_caching and seq.computed // self.config.block_size > len(seq.keys):
            self.blocks.register(seq.table, full_block_keys(seq, self.config.block_size))

    def _append(self, seq: Seq, token: int, logprob: Any) -> None:
        seq.tokens.append(token)
        seq.output_ids.append(token)
        if seq.constraint is not None:
            seq.constraint.advance(token)
        is_eos = token in self.eos and not seq.params.ignore_eos
        text = "" if is_eos else seq.text.push(token)
        reason = self._finish_reason(seq, is_eos)
        if reason is not None:
            seq.finish_reason = reason
            text += seq.text.flush()
            self.free(seq)
        usage = self._usage(seq.request) if seq.request.done() else None
        lp = (logprob,) if logprob is not None else ()
        self._emit(seq.request, TokenEvent(seq.index, (token,), text, reason, usage, lp))
        if usage is not None:
            self._emit(seq.request, END)

    def _finish_reason(self, seq: Seq, is_eos: bool) -> str | None:
        if is_eos or seq.text.stopped or (seq.constraint is not None and seq.constraint.done):
            return FINISH_STOP
        if len(seq.output_ids) >= seq.params.max_tokens or len(seq.tokens) >= self.max_context:
            return FINISH_LENGTH
        return None

    def _usage(self, request: Request) -> Usage:
        completion = sum(len(seq.output_ids) for seq in request.seqs)
        return Usage(len(request.prompt), completion, request.cached_tokens)

    def free(self, seq: Seq) -> None:
        """Return a sequence's blocks to the pool (cached prefix blocks stay reusable)."""
        self.blocks.free(seq.table)
        seq.table = []
        if self._speculator is not None:
            self._speculator.forget(seq)

    def _emit(self, request: Request, item: Any) -> None:
        """Queue an event; `_deliver` hands a whole iteration's events over at once."""
        self._outbox.setdefault(request.loop, []).append((request, item))

    def _deliver(self) -> None:
        """One wake-up per caller loop per iteration, not one per event (32 streams: 1, not 32)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody listens any more
                for request, _ in items:
                    request.cancelled = True

    def _drop_abandoned(self) -> None:
        """Remove cancelled requests, and fail those past their deadline."""
        now = self.clock()
        for seq in [*self._waiting, *self._running]:
            request = seq.request
            if request.deadline is not None and now > request.deadline and not request.done():
                self._fail(request, DeadlineExceeded("the request's deadline passed"))
            elif request.cancelled:
                self._forget(request)

    def _fail(self, request: Request, error: BaseException) -> None:
        self._forget(request)
        self._emit(request, error)

    def _forget(self, request: Request) -> None:
        for seq in request.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "cancelled"
                self.free(seq)
        request.cancelled = True
        self._waiting = deque(s for s in self._waiting if s.request is not request)
        self._running = [s for s in self._running if s.request is not request]

    def _fail_all(self, error: BaseException) -> None:
        self._take_inbox()
        for request in {seq.request for seq in (*self._waiting, *self._running)}:
            self._fail(request, error)


def _put_all(items: list[tuple[Request, Any]]) -> None:
    """Runs in the caller's loop: hand each request its events, in order."""
    for request, item in items:
        request.queue.put_nowait(item)


def _local_forward(
    model: LlamaModel, pool: torch.Tensor, fast: bool, batch: Batch, all_logits: bool
) -> torch.Tensor:
    """This process's forward: every position's logits (verification: each token a decode
    row where decode.forward_rows serves it, so that it matches plain decoding; else
    model.forward), or the last token's through decode.forward_step (lean for decode steps)."""
    if all_logits:
        rows = forward_rows(model, pool, batch) if fast else None
        return rows if rows is not None else forward(model, pool, batch, True)
    return forward_step(model, pool, batch, fast)
