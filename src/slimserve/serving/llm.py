"""Language models in the engine: generation streams with residency, admission and metrics.

A text-generation unit is loaded like any other (runtimes/generation.py: its runtime owns a
started `GenerationEngine`). `generate` resolves and acquires the unit (loading it on first
use, counting it as in use so it is not evicted mid-stream), applies the same admission as
`Engine.infer` (rate limits, concurrency), encodes the prompt and submits it; the returned
`TextStream` yields `TokenEvent`s and, when it ends for any reason, releases the unit and
records the request in the metrics. Submission errors (bad parameters, a prompt too long, a
full queue) raise here, before any event, so a transport can still answer with a status.

No torch at import: the generation runtime's module is only named in type hints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from slimserve.errors import Code, InvalidArgument, SlimserveError
from slimserve.repository.store import split_served_name
from slimserve.runtimes.llm import SamplingParams, TokenEvent
from slimserve.serving.models import Unit
from slimserve.serving.sampling_args import number

if TYPE_CHECKING:
    from slimserve.runtimes.generation import GenerationRuntime
    from slimserve.runtimes.llm.stream import GenerationStream
    from slimserve.serving.engine import Engine

TEXT_GENERATION = "text-generation"
EMBEDDING = "embedding"
DEFAULT_CHAT_MAX_TOKENS = 1024  # chat without max_tokens: up to this, or the context's end

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, Any]]


def find_unit(engine: Engine, model: str, task: str) -> Unit:
    """The unit serving `model` ('name[:variant]'), which must be of `task`."""
    name, variant = split_served_name(model)
    unit = engine.models.find(name, None, variant)
    found = unit.target.config.task
    if found != task:
        route = "/v1/embeddings" if found == EMBEDDING else "the v2 infer API"
        if found == TEXT_GENERATION:
            route = "/v1/completions or /v1/chat/completions"
        raise InvalidArgument(
            f"model '{model}' is not a {task} model (its task is {found or 'none'}); "
            f"use it through {route}"
        )
    return unit


async def generate(
    engine: Engine,
    model: str,
    params: SamplingParams,
    *,
    prompt: Prompt | None = None,
    messages: Messages | None = None,
    fill_max_tokens: bool = False,
    deadline_s: float | None = None,
    client: str | None = None,
) -> TextStream:
    """Submit one prompt (text, token ids, or chat messages) to `model`; see the module doc.

    `fill_max_tokens`: ignore params.max_tokens and allow up to the context's end (at most
    DEFAULT_CHAT_MAX_TOKENS), as the chat API does when max_tokens is not given.
    """
    started = time.perf_counter()
    try:
        return await _submit(
            engine, model, params, prompt, messages, fill_max_tokens, deadline_s, client
        )
    except SlimserveError as exc:  # refused before any event: counted like a failed infer
        name = model.partition(":")[0]
        label = name if name in engine.models.models else "_other"
        outcome = exc.code.value.lower()
        engine.metrics.observe_request(label, "", outcome, time.perf_counter() - started)
        raise


async def _submit(
    engine: Engine,
    model: str,
    params: SamplingParams,
    prompt: Prompt | None,
    messages: Messages | None,
    fill_max_tokens: bool,
    deadline_s: float | None,
    client: str | None,
) -> TextStream:
    unit = find_unit(engine, model, TEXT_GENERATION)
    name = unit.target.model
    limit = configured_timeout_s(unit.target.config.parameters)
    if limit is not None:  # the server's own bound; the request's `timeout` may be shorter
        deadline_s = limit if deadline_s is None else min(deadline_s, limit)
    now = time.monotonic()
    engine.admission.check_rate(client, name, unit.target.config, now)
    engine.admission.check_load(unit, deadline_s)
    unit = await engine.models.acquire_unit(unit)
    engine.admission.in_flight[name] += 1
    try:
        runtime = _runtime(unit)
        ids = _encode(runtime, prompt, messages)
        if fill_max_tokens:
            room = runtime_engine(runtime).max_context - len(ids)
            params = dataclasses.replace(
                params, max_tokens=max(1, min(DEFAULT_CHAT_MAX_TOKENS, room))
            )
        stream = runtime_engine(runtime).submit(ids, params, deadline_s)
    except BaseException:
        engine.admission.in_flight[name] -= 1
        engine.models.release(unit)
        raise
    return TextStream(engine, unit, runtime, stream, len(ids), params.n)


def configured_timeout_s(parameters: Mapping[str, Any]) -> float | None:
    """model.yaml `parameters.timeout_s`: the longest one generation request may take."""
    value = parameters.get("timeout_s")
    return None if value is None else number(value, "timeout_s")


def _runtime(unit: Unit) -> GenerationRuntime:
    runtime = unit.runtime
    if runtime is None or getattr(runtime, "engine", None) is None:
        raise InvalidArgument(f"{unit.target.key} is not loaded as a language model")
    return runtime  # type: ignore[return-value]


def runtime_engine(runtime: GenerationRuntime) -> Any:
    engine = runtime.engine
    assert engine is not None  # checked by _runtime
    return engine


def _encode(
    runtime: GenerationRuntime, prompt: Prompt | None, messages: Messages | None
) -> list[int]:
    text = runtime.text
    assert text is not None
    if messages is not None:
        return text.encode_chat([dict(m) for m in messages])
    if isinstance(prompt, str):
        return text.encode(prompt)
    if prompt is None:
        raise InvalidArgument("give a prompt or chat messages")
    return list(prompt)


class TextStream:
    """A request's events; ending, failing or closing it releases the unit once."""

    def __init__(
        self,
        engine: Engine,
        unit: Unit,
        runtime: GenerationRuntime,
        stream: GenerationStream,
        prompt_tokens: int,
        n: int = 1,
    ) -> None:
        self._engine, self._unit, self._runtime, self._stream = engine, unit, runtime, stream
        self.prompt_tokens = prompt_tokens
        target = unit.target
        self._meter = engine.metrics.generation.meter(
            target.model, target.variant or "", prompt_tokens, n
        )
        self._started = time.perf_counter()
        self._done = False

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> TokenEvent:
        try:
            event = await self._stream.__anext__()
        except StopAsyncIteration:
            self._finish("success")
            raise
        except SlimserveError as exc:
            self._finish(exc.code.value.lower())
            raise
        except BaseException:
            self._finish("cancelled")
            raise
        self._meter.tokens(event.index, len(event.token_ids), event.finish_reason)
        return event

    async def aclose(self) -> None:
        """Stop generating (no effect once finished)."""
        self._stream.cancel()
        self._finish("cancelled")

    def token_text(self, token_id: int) -> str:
        """One token as text, for logprobs."""
        text = self._runtime.text
        return "" if text is None else str(text.tokenizer.decode([token_id]))

    def _finish(self, outcome: str) -> None:
        if self._done:
            return
        self._done = True
        self._meter.close()
        unit, engine = self._unit, self._engine
        engine.models.release(unit)
        engine.admission.in_flight[unit.target.model] -= 1
        elapsed = time.perf_counter() - self._started
        variant = unit.target.variant or ""
        engine.metrics.observe_request(unit.target.model, variant, outcome, elapsed)
        if outcome in ("success", Code.INTERNAL.value.lower()):
            engine.admission.record(unit, time.monotonic(), outcome == "success", elapsed)


async def merge(streams: Sequence[TextStream]) -> AsyncGenerator[tuple[int, TokenEvent], None]:
    """(stream index, event) from several streams as they come; closing closes them all."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: TextStream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((i, event))
            queue.put_nowait((i, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


def count_tokens(engine: Engine, model: str, texts: Sequence[str]) -> int:
    """Tokens in `texts` for an embedding model's usage (0 when its tokenizer is unreadable).

    A private tokenizer copy: the runtime's own is used from worker threads and a fast
    tokenizer fails when two threads use it at once.
    """
    unit = find_unit(engine, model, EMBEDDING)
    tokenizer = _tokenizer(str(unit.target.path))
    if tokenizer is None:
        return 0
    return sum(len(ids) for ids in tokenizer(list(texts))["input_ids"])


@functools.lru_cache(maxsize=16)
def _tokenizer(folder: str) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - usage counts are best effort (e.g. encrypted files)
        return None
