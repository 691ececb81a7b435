"""OpenAI response bodies and stream chunks for completions and chat, from TokenEvents."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from slimserve.serving.llm import TextStream, TokenEvent, TokenLogprob, Usage, merge
from slimserve.transport.openai_structured import Structured, tool_calls

# A choice's token logprobs, each with the stream whose tokenizer spells its tokens.
Pairs = list[tuple[TextStream, TokenLogprob]]


def usage_doc(usages: list[Usage]) -> dict[str, Any]:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in usages)},
    }


class Reply:
    """What completions and chat share: ids, choice bookkeeping, collecting and streaming."""

    object_name = ""
    chunk_name = ""

    prefix = "cmpl"

    def __init__(self, model: str, n: int, include_usage: bool) -> None:
        self.model, self.n, self.include_usage = model, n, include_usage
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def head(self, name: str) -> dict[str, Any]:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model}

    async def collect(self, streams: list[TextStream]) -> dict[str, Any]:
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        logprobs: dict[int, Pairs] = {}
        usages: list[Usage] = []
        async with contextlib.aclosing(merge(streams)) as events:
            async for which, event in events:
                index = which * self.n + event.index
                texts.setdefault(index, []).append(event.text)
                logprobs.setdefault(index, []).extend((streams[which], lp) for lp in event.logprobs)
                finish[index] = event.finish_reason or finish.get(index)
                if event.usage is not None:
                    usages.append(event.usage)
        choices = [self.choice(i, "".join(texts[i]), finish[i], logprobs[i]) for i in sorted(texts)]
        return {**self.head(self.object_name), "choices": choices, "usage": usage_doc(usages)}

    def choice(self, index: int, text: str, finish: str | None, logprobs: Pairs) -> dict[str, Any]:
        raise NotImplementedError

    def logprobs_doc(self, items: Pairs) -> Any:
        raise NotImplementedError

    def choice_doc(
        self,
        index: int,
        finish: str | None,
        pairs: Pairs,
        **body: Any,
    ) -> dict[str, Any]:
        """One choice; `body` is its content: text=, message= or (a stream chunk's) delta=."""
        return {
            "index": index,
            **body,
            "logprobs": self.logprobs_doc(pairs),
            "finish_reason": finish,
        }

    async def chunks(self, streams: list[TextStream]) -> AsyncIterator[dict[str, Any]]:
        usages: list[Usage] = []
        for first in self.first_chunks(len(streams)):
            yield first
        async with contextlib.aclosing(merge(streams)) as events:
            async for which, event in events:
                if event.usage is not None:
                    usages.append(event.usage)
                if not event.text and event.finish_reason is None and not event.logprobs:
                    continue  # held back (a possible stop string): nothing to say yet
                index = which * self.n + event.index
                pairs = [(streams[which], lp) for lp in event.logprobs]
                doc = self.chunk(index, event, pairs)
                if doc is not None:  # None: held back (a tool call is sent whole)
                    yield doc
        if self.include_usage:
            yield {**self.head(self.chunk_name), "choices": [], "usage": usage_doc(usages)}

    def first_chunks(self, prompts: int) -> list[dict[str, Any]]:
        return []

    def chunk(self, index: int, event: TokenEvent, pairs: Pairs) -> dict[str, Any] | None:
        raise NotImplementedError

    def with_usage(self, doc: dict[str, Any]) -> dict[str, Any]:
        if self.include_usage:
            doc["usage"] = None
        return doc


class Completion(Reply):
    object_name = chunk_name = "text_completion"
    prefix = "cmpl"

    def choice(self, index: int, text: str, finish: str | None, logprobs: Pairs) -> dict[str, Any]:
        return self.choice_doc(index, finish, logprobs, text=text)

    def logprobs_doc(self, items: Pairs) -> Any:
        if not items:
            return None
        tokens = [stream.token_text(lp.token_id) for stream, lp in items]
        offsets = np.cumsum([0, *map(len, tokens)])[:-1].tolist()
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for _, lp in items],
            "top_logprobs": [{stream.token_text(t): v for t, v in lp.top} for stream, lp in items],
            "text_offset": offsets,
        }

    def chunk(self, index: int, event: TokenEvent, pairs: Pairs) -> dict[str, Any]:
        choice = self.choice(index, event.text, event.finish_reason, pairs)
        return self.with_usage({**self.head(self.chunk_name), "choices": [choice]})


class Chat(Reply):
    """Chat replies; where tools were given, a choice whose text is a call is sent as
    `tool_calls` (finish_reason tool_calls), whole: streamed, it is held until it ends."""

    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    prefix = "chatcmpl"

    def __init__(
        self, model: str, n: int, include_usage: bool, structured: Structured | None = None
    ) -> None:
        super().__init__(model, n, include_usage)
        self.structured = structured or Structured()
        self._held: dict[int, list[str]] = {}

    def choice(self, index: int, text: str, finish: str | None, logprobs: Pairs) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        calls = tool_calls(text, self.structured) if self.structured.calls else None
        if calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "tool_calls" if finish == "stop" else finish
        return self.choice_doc(index, finish, logprobs, message=message)

    def logprobs_doc(self, items: Pairs) -> Any:
        if not items:
            return None

        def entry(stream: TextStream, token_id: int, logprob: float) -> dict[str, Any]:
            text = stream.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {
                    **entry(stream, lp.token_id, lp.logprob),
                    "top_logprobs": [entry(stream, t, v) for t, v in lp.top],
                }
                for stream, lp in items
            ]
        }

    def first_chunks(self, prompts: int) -> list[dict[str, Any]]:
        """The role first, one chunk per choice, before any token."""
        return [
            self.with_usage(
                {
                    **self.head(self.chunk_name),
                    "choices": [
                        self.choice_doc(i, None, [], delta={"role": "assistant", "content": ""})
                    ],
                }
            )
            for i in range(prompts * self.n)
        ]

    def chunk(self, index: int, event: TokenEvent, pairs: Pairs) -> dict[str, Any] | None:
        if self.structured.calls:
            return self._held_chunk(index, event)
        delta = {"content": event.text} if event.text else {}
        return self._chunk_doc(index, delta, event.finish_reason, pairs)

    def _chunk_doc(
        self,
        index: int,
        delta: dict[str, Any],
        finish: str | None,
        pairs: Pairs,
    ) -> dict[str, Any]:
        choice = self.choice_doc(index, finish, pairs, delta=delta)
        return self.with_usage({**self.head(self.chunk_name), "choices": [choice]})

    def _held_chunk(self, index: int, event: TokenEvent) -> dict[str, Any] | None:
        """Tools given: the choice's text is held to its end, then sent as one delta."""
        self._held.setdefault(index, []).append(event.text)
        if event.finish_reason is None:
            return None
        text = "".join(self._held.pop(index))
        calls = tool_calls(text, self.structured)
        if calls is None:
            return self._chunk_doc(index, {"content": text}, event.finish_reason, [])
        deltas = [{"index": i, **call} for i, call in enumerate(calls)]
        finish = "tool_calls" if event.finish_reason == "stop" else event.finish_reason
        return self._chunk_doc(index, {"tool_calls": deltas}, finish, [])
