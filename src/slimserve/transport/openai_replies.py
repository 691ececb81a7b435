"""OpenAI response bodies and stream chunks for completions and chat, from TokenEvents."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from slimserve.serving.llm import TextStream, TokenEvent, TokenLogprob, Usage, merge


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
        logprobs: dict[int, list[tuple[TextStream, TokenLogprob]]] = {}
        usages: list[Usage] = []
        async with contextlib.aclosing(merge(streams)) as events:
            async for which, event in events:
                index = which * self.n + event.index
                texts.setdefault(index, []).append(event.text)
                logprobs.setdefault(index, []).extend((streams[which], lp) for lp in event.logprobs)
                finish[index] = event.finish_reason or finish.get(index)
                if event.usage is not None:
                    usages.append(event.usage)
        choices = [
            self.choice(i, "".join(texts[i]), finish[i], logprobs[i], streams)
            for i in sorted(texts)
        ]
        return {**self.head(self.object_name), "choices": choices, "usage": usage_doc(usages)}

    def choice(
        self,
        index: int,
        text: str,
        finish: str | None,
        logprobs: list[tuple[TextStream, TokenLogprob]],
        streams: list[TextStream],
    ) -> dict[str, Any]:
        raise NotImplementedError

    def logprobs_doc(self, items: list[tuple[TextStream, TokenLogprob]], with_lp: bool) -> Any:
        raise NotImplementedError

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
                yield self.chunk(index, event, pairs)
        if self.include_usage:
            yield {**self.head(self.chunk_name), "choices": [], "usage": usage_doc(usages)}

    def first_chunks(self, prompts: int) -> list[dict[str, Any]]:
        return []

    def chunk(
        self, index: int, event: TokenEvent, pairs: list[tuple[TextStream, TokenLogprob]]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def with_usage(self, doc: dict[str, Any]) -> dict[str, Any]:
        if self.include_usage:
            doc["usage"] = None
        return doc


class Completion(Reply):
    object_name = chunk_name = "text_completion"
    prefix = "cmpl"

    def choice(
        self,
        index: int,
        text: str,
        finish: str | None,
        logprobs: list[tuple[TextStream, TokenLogprob]],
        streams: list[TextStream],
    ) -> dict[str, Any]:
        return {
            "index": index,
            "text": text,
            "logprobs": self.logprobs_doc(logprobs, bool(logprobs)),
            "finish_reason": finish,
        }

    def logprobs_doc(self, items: list[tuple[TextStream, TokenLogprob]], with_lp: bool) -> Any:
        if not with_lp:
            return None
        tokens = [stream.token_text(lp.token_id) for stream, lp in items]
        offsets = np.cumsum([0, *map(len, tokens)])[:-1].tolist()
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for _, lp in items],
            "top_logprobs": [{stream.token_text(t): v for t, v in lp.top} for stream, lp in items],
            "text_offset": offsets,
        }

    def chunk(
        self, index: int, event: TokenEvent, pairs: list[tuple[TextStream, TokenLogprob]]
    ) -> dict[str, Any]:
        choice = self.choice(index, event.text, event.finish_reason, pairs, [])
        return self.with_usage({**self.head(self.chunk_name), "choices": [choice]})


class Chat(Reply):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    prefix = "chatcmpl"

    def choice(
        self,
        index: int,
        text: str,
        finish: str | None,
        logprobs: list[tuple[TextStream, TokenLogprob]],
        streams: list[TextStream],
    ) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": self.logprobs_doc(logprobs, bool(logprobs)),
            "finish_reason": finish,
        }

    def logprobs_doc(self, items: list[tuple[TextStream, TokenLogprob]], with_lp: bool) -> Any:
        if not with_lp:
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
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
            for i in range(prompts * self.n)
        ]

    def chunk(
        self, index: int, event: TokenEvent, pairs: list[tuple[TextStream, TokenLogprob]]
    ) -> dict[str, Any]:
        delta = {"content": event.text} if event.text else {}
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": self.logprobs_doc(pairs, bool(pairs)),
            "finish_reason": event.finish_reason,
        }
        return self.with_usage({**self.head(self.chunk_name), "choices": [choice]})
