"""Language models in the engine: finding the unit, encoding prompts, and token streams.

A text-generation unit is loaded like any other; its runtime is a `TextGenerator`
(runtimes/base.py), the only way the serving layer talks to it. `Engine.generate` admits,
acquires and submits (serving/engine.py); the `TextStream` it returns yields `TokenEvent`s
and, when it ends for any reason, calls back once so the engine releases the unit and
records the outcome. Submission errors (bad parameters, a prompt too long, a full queue)
raise before any event, so a transport can still answer with a status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any

from slimserve.errors import InvalidArgument, SlimserveError
from slimserve.repository.store import split_served_name
from slimserve.runtimes.base import TextGenerator
from slimserve.runtimes.llm import SamplingParams, TokenEvent, TokenLogprob, Usage
from slimserve.runtimes.llm.params import Grammar
from slimserve.runtimes.llm.stream import GenerationStream
from slimserve.serving.metrics import TokenMeter
from slimserve.serving.models import ModelManager, Unit
from slimserve.serving.sampling_args import number

# The vocabulary of generation requests, for the transports (which speak to serving, not to
# the runtimes that define it).
__all__ = [
    "EMBEDDING",
    "TEXT_GENERATION",
    "Grammar",
    "SamplingParams",
    "TextStream",
    "TokenEvent",
    "TokenLogprob",
    "Usage",
    "merge",
]

TEXT_GENERATION = "text-generation"
EMBEDDING = "embedding"
DEFAULT_CHAT_MAX_TOKENS = 1024  # chat without max_tokens: up to this, or the context's end

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, Any]]


def find_unit(models: ModelManager, model: str, task: str) -> Unit:
    """The unit serving `model` ('name[:variant]'), which must be of `task`."""
    name, variant = split_served_name(model)
    unit = models.find(name, None, variant)
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


def text_generator(unit: Unit) -> TextGenerator:
    """The loaded unit's runtime as a language model."""
    runtime = unit.runtime
    if not isinstance(runtime, TextGenerator):
        raise InvalidArgument(f"{unit.target.key} is not loaded as a language model")
    return runtime


def configured_timeout_s(parameters: Mapping[str, Any]) -> float | None:
    """model.yaml `parameters.timeout_s`: the longest one generation request may take."""
    value = parameters.get("timeout_s")
    return None if value is None else number(value, "timeout_s")


def encode_prompt(
    generator: TextGenerator, prompt: Prompt | None, messages: Messages | None
) -> list[int]:
    if messages is not None:
        return generator.encode_chat([dict(m) for m in messages])
    if isinstance(prompt, str):
        return generator.encode(prompt)
    if prompt is None:
        raise InvalidArgument("give a prompt or chat messages")
    return list(prompt)


def fill_context(
    generator: TextGenerator, ids: list[int], params: SamplingParams
) -> SamplingParams:
    """max_tokens up to the context's end, at most DEFAULT_CHAT_MAX_TOKENS (chat without
    max_tokens)."""
    room = generator.max_context - len(ids)
    return dataclasses.replace(params, max_tokens=max(1, min(DEFAULT_CHAT_MAX_TOKENS, room)))


@dataclasses.dataclass(frozen=True, slots=True)
class Served:
    """Which unit answers a generation: a variant, and whether it was chosen instead of the
    one asked for (the breaker was open, or the model was under pressure)."""

    variant: str | None = None
    degraded: bool = False
    # A per-request objective's outcome (serving/slo.py response_parameters); None: no
    # objective, or a variant was named explicitly.
    objective: dict[str, Any] | None = None


class TextStream:
    """A request's events; ending, failing or closing it calls `on_end(outcome)` once."""

    def __init__(
        self,
        stream: GenerationStream,
        generator: TextGenerator,
        prompt_tokens: int,
        meter: TokenMeter,
        on_end: Callable[[str], None],
        served: Served | None = None,
    ) -> None:
        self._stream, self._generator, self._meter = stream, generator, meter
        self.prompt_tokens = prompt_tokens
        self.served = served or Served()
        self._on_end = on_end
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
        return self._generator.token_text(token_id)

    def _finish(self, outcome: str) -> None:
        if self._done:
            return
        self._done = True
        self._meter.close()
        self._on_end(outcome)


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


def count_tokens(models: ModelManager, model: str, texts: Sequence[str]) -> int:
    """Tokens in `texts` for an embedding model's usage (0 when its tokenizer is unreadable).

    A private tokenizer copy: the runtime's own is used from worker threads and a fast
    tokenizer fails when two threads use it at once.
    """
    unit = find_unit(models, model, EMBEDDING)
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
