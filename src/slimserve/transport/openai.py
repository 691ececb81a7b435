"""The OpenAI API on the HTTP port: models, embeddings, completions, chat, streaming.

Routes (the HTTP app hands every path under /v1/ here):
  GET  /v1/models | /v1/models/{id}   the repository's embedding and text-generation models
  POST /v1/embeddings                 `input` str | [str]; `encoding_format` float | base64
  POST /v1/completions                `prompt` str | [str] | token ids | [token ids]
  POST /v1/chat/completions           `messages`, rendered by the tokenizer's chat template

`stream: true` answers `text/event-stream`: each event is exactly `data: <json>\\n\\n`, the
last `data: [DONE]\\n\\n`; an error after the first byte is sent as a data event
`{"error": ...}` and then [DONE]. A client that disconnects mid-stream cancels generation
(its KV blocks are freed at the engine's next iteration). Errors are
`{"error": {"message", "type", "param", "code"}}` with the status from http.STATUS.

Auth is the v2 routes': `Authorization: Bearer KEY` with scope `infer` on the model.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
import orjson

from slimserve.errors import Code, InvalidArgument, NotFound, PayloadTooLarge, SlimserveError
from slimserve.security.keys import bearer_token
from slimserve.serving.engine import Engine
from slimserve.serving.generation import SamplingParams, TokenEvent, TokenLogprob, Usage
from slimserve.serving.llm import EMBEDDING, TEXT_GENERATION, TextStream, count_tokens, merge
from slimserve.transport.http import STATUS

log = logging.getLogger("slimserve.openai")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_SSE = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies: pass each event on at once
]
_DONE = b"data: [DONE]\n\n"
_TYPES = {  # OpenAI's error `type` for each code
    Code.INVALID_ARGUMENT: "invalid_request_error",
    Code.FAILED_PRECONDITION: "invalid_request_error",
    Code.PAYLOAD_TOO_LARGE: "invalid_request_error",
    Code.NOT_FOUND: "not_found_error",
    Code.UNAUTHENTICATED: "authentication_error",
    Code.PERMISSION_DENIED: "permission_error",
    Code.RESOURCE_EXHAUSTED: "rate_limit_error",
}
_PARAM = re.compile(r"sampling parameter (\w+)=")  # the field named by SamplingParams' errors
_UNSUPPORTED = ("suffix", "logit_bias", "tools", "functions", "response_format")


class BadRequest(InvalidArgument):
    """A request field is wrong; `param` names it in the error body."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _RouteError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class OpenAIApp:
    """An ASGI callable for /v1/ paths, mounted by the v2 HTTP app."""

    def __init__(self, engine: Engine, max_body_bytes: int) -> None:
        self.engine = engine
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._route(scope, receive, send)
        except SlimserveError as exc:
            await _send_json(send, STATUS.get(exc.code, 500), error_doc(exc))
        except _RouteError as exc:
            await _send_json(send, exc.status, _error(exc.message, "invalid_request_error"))
        except _Disconnected:
            return

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = scope["path"].rstrip("/").split("/")[2:]  # "/v1/a/b" -> ["a", "b"]
        method, token = scope["method"], _token(scope)
        client = _client(scope)
        if parts[:1] == ["models"] and len(parts) <= 2:
            _expect(method, "GET", scope)
            await _send_json(send, 200, self._models(token, parts[1] if len(parts) == 2 else None))
            return
        handlers = {
            ("embeddings",): self._embeddings,
            ("completions",): self._completions,
            ("chat", "completions"): self._chat,
        }
        handler = handlers.get(tuple(parts))
        if handler is None:
            raise _RouteError(404, f"no such endpoint: {method} {scope['path'][:200]!r}")
        _expect(method, "POST", scope)
        body = await self._body(scope, receive)
        model = _model(body)
        identity = self.engine.authorize(token, "infer", model)
        who = identity.client if identity.key_id else client
        await handler(body, model, who, receive, send)

    # -- models ----------------------------------------------------------------------------

    def _models(self, token: str | None, wanted: str | None) -> dict[str, Any]:
        self.engine.authorize(token, "infer", wanted)
        rows = [m for m in self._listing() if wanted is None or m["id"] == wanted]
        if wanted is None:
            return {"object": "list", "data": rows}
        if not rows:
            raise NotFound(f"model '{wanted}' is not an embedding or language model here")
        return rows[0]

    def _listing(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.engine.repository.model_names():
            with contextlib.suppress(SlimserveError):
                config = self.engine.models.entry(name).config
                if config is not None and config.task in (EMBEDDING, TEXT_GENERATION):
                    rows.append(
                        {"id": name, "object": "model", "created": 0, "owned_by": "slimserve"}
                    )
        return rows

    # -- embeddings ------------------------------------------------------------------------

    async def _embeddings(
        self, body: dict[str, Any], model: str, client: str | None, receive: Receive, send: Send
    ) -> None:
        texts = _embedding_input(body.get("input"))
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest(
                f"encoding_format {encoding!r} is not supported; use float or base64",
                "encoding_format",
            )
        if body.get("dimensions") is not None:
            raise BadRequest("dimensions is not supported; leave it out", "dimensions")
        vectors = np.ascontiguousarray(await self.engine.embed(model, texts, client), "<f4")
        tokens = count_tokens(self.engine, model, texts)
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(row, encoding)}
            for i, row in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        await _send_json(
            send, 200, {"object": "list", "data": data, "model": model, "usage": usage}
        )

    # -- completions -----------------------------------------------------------------------

    async def _completions(
        self, body: dict[str, Any], model: str, client: str | None, receive: Receive, send: Send
    ) -> None:
        _refuse_unsupported(body)
        if body.get("echo"):
            raise BadRequest("echo is not supported; leave it out or set it to false", "echo")
        if body.get("best_of") not in (None, 1, body.get("n", 1)):
            raise BadRequest("best_of is not supported; leave it out", "best_of")
        stream_opts = _stream_options(body)
        params = sampling(body, chat=False)
        prompts = _prompts(body.get("prompt"))
        streams = await self._submit_all(model, params, client, prompts=prompts)
        reply = _Completion(model, params.n, stream_opts is not None and stream_opts)
        if stream_opts is None:
            await _send_json(send, 200, await reply.collect(streams))
        else:
            await _stream(send, receive, reply.chunks(streams))

    async def _chat(
        self, body: dict[str, Any], model: str, client: str | None, receive: Receive, send: Send
    ) -> None:
        _refuse_unsupported(body)
        stream_opts = _stream_options(body)
        params = sampling(body, chat=True)
        messages = _messages(body.get("messages"))
        unset = body.get("max_completion_tokens") is None and body.get("max_tokens") is None
        stream = await self.engine.generate(
            model, params, messages=messages, fill_max_tokens=unset, client=client
        )
        reply = _Chat(model, params.n, stream_opts is not None and stream_opts)
        if stream_opts is None:
            await _send_json(send, 200, await reply.collect([stream]))
        else:
            await _stream(send, receive, reply.chunks([stream]))

    async def _submit_all(
        self, model: str, params: SamplingParams, client: str | None, prompts: list[Any]
    ) -> list[TextStream]:
        """One engine request per prompt; if one is refused, the others are cancelled."""
        streams: list[TextStream] = []
        try:
            for prompt in prompts:
                streams.append(
                    await self.engine.generate(model, params, prompt=prompt, client=client)
                )
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        return streams

    # -- bodies ----------------------------------------------------------------------------

    async def _body(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        chunks, size = [], 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(
                    f"the request body is over the limit of {self.max_body_bytes} bytes; "
                    "send a smaller request or raise --max-body-bytes"
                )
            chunks.append(chunk)
            more = message.get("more_body", False)
        try:
            doc = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise BadRequest("the request body must be a JSON object")
        return doc


class _Disconnected(Exception):
    pass


# -- sampling parameters -------------------------------------------------------------------


def sampling(body: dict[str, Any], chat: bool) -> SamplingParams:
    """SamplingParams from an OpenAI request body; a bad value is a 400 naming its field."""
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    fields: dict[str, Any] = {
        "max_tokens": 16 if max_tokens is None else _int(max_tokens, "max_tokens"),
        "temperature": _number(body, "temperature", 1.0),
        "top_p": _number(body, "top_p", 1.0),
        "n": _int(body.get("n", 1) if body.get("n") is not None else 1, "n"),
        "stop": _stop(body.get("stop")),
        "seed": None if body.get("seed") is None else _int(body["seed"], "seed"),
        "presence_penalty": _number(body, "presence_penalty", 0.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0),
        "logprobs": _logprobs(body, chat),
    }
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise BadRequest("user must be a string", "user")
    try:
        return SamplingParams(**fields)
    except InvalidArgument as exc:
        found = _PARAM.search(exc.message)
        raise BadRequest(exc.message, found.group(1) if found else None) from None


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {value!r}", name)
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number, got {value!r}", name)
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise BadRequest("stop must be a string or a list of up to 4 strings", "stop")


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    value = body.get("logprobs")
    if not chat:
        return None if value is None else _int(value, "logprobs")
    if value is None or value is False:
        if body.get("top_logprobs") is not None:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    if value is not True:
        raise BadRequest("logprobs must be true or false for chat completions", "logprobs")
    top = body.get("top_logprobs")
    return 0 if top is None else _int(top, "top_logprobs")


def _stream_options(body: dict[str, Any]) -> bool | None:
    """None: no streaming; else whether to send a final usage chunk."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream not in (None, True, False):
        raise BadRequest("stream must be true or false", "stream")
    if not stream:
        if options is not None:
            raise BadRequest(
                "stream_options is only allowed with stream: true; set stream: true or "
                "leave stream_options out",
                "stream_options",
            )
        return None
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise BadRequest("stream_options.include_usage must be true or false", "stream_options")
    return include


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name in _UNSUPPORTED:
        if body.get(name):
            raise BadRequest(f"{name} is not supported by this server; leave it out", name)


# -- inputs --------------------------------------------------------------------------------


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required: the name of a model in the repository", "model")
    return model


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _prompts(value: Any) -> list[Any]:
    """A completion request's prompts: each a string or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if _is_ids(value):
            return [value]
        if all(isinstance(p, str) or (_is_ids(p) and p) for p in value):
            return list(value)
    raise BadRequest(
        "prompt must be a string, a list of strings, a list of token ids, or a list of lists "
        "of token ids (none empty)",
        "prompt",
    )


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a role", "messages")
        out.append({"role": message["role"], "content": _content(message.get("content"), i)})
    return out


def _content(value: Any, i: int) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(value) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")


def _embedding_input(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        return value
    if isinstance(value, list) and value and (_is_ids(value) or all(_is_ids(v) for v in value)):
        raise BadRequest(
            "token ids are not supported by /v1/embeddings here; send the text (a string or a "
            "list of strings)",
            "input",
        )
    raise BadRequest("input must be a non-empty string or list of strings", "input")


def _vector(row: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32 bytes, as the openai client decodes them
        return base64.b64encode(row.tobytes()).decode("ascii")
    return row.tolist()  # type: ignore[no-any-return]


# -- responses -----------------------------------------------------------------------------


def usage_doc(usages: list[Usage]) -> dict[str, Any]:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in usages)},
    }


class _Reply:
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


class _Completion(_Reply):
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
        choice = {
            "index": index,
            "text": event.text,
            "logprobs": self.logprobs_doc(pairs, bool(pairs)),
            "finish_reason": event.finish_reason,
        }
        return self.with_usage({**self.head(self.chunk_name), "choices": [choice]})


class _Chat(_Reply):
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


# -- sending -------------------------------------------------------------------------------


async def _stream(send: Send, receive: Receive, chunks: AsyncIterator[dict[str, Any]]) -> None:
    """Send `chunks` as server-sent events; a disconnect cancels the generation."""
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    pump = asyncio.ensure_future(_pump(send, chunks))
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, watch):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if pump.cancelled():
        return  # the client is gone: the generation was cancelled with the pump
    pump.result()


async def _pump(send: Send, chunks: AsyncIterator[dict[str, Any]]) -> None:
    try:
        async for chunk in chunks:
            await _event(send, orjson.dumps(chunk))
    except SlimserveError as exc:
        await _event(send, orjson.dumps(error_doc(exc)))
    except Exception:  # noqa: BLE001 - the status is sent: report in the stream, log once
        log.exception("generation stream failed")
        await _event(
            send, orjson.dumps(_error("internal server error; see the log", "server_error"))
        )
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    await send({"type": "http.response.body", "body": _DONE, "more_body": False})


async def _event(send: Send, data: bytes) -> None:
    await send(
        {"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True}
    )


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, doc: Any) -> None:
    body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    headers = [*_JSON, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_doc(exc: SlimserveError) -> dict[str, Any]:
    kind = _TYPES.get(exc.code, "server_error")
    param = getattr(exc, "param", None)
    code = "model_not_found" if exc.code is Code.NOT_FOUND else exc.code.value.lower()
    return _error(exc.message, kind, param, code)


def _error(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _expect(method: str, wanted: str, scope: Scope) -> None:
    if method != wanted:
        raise _RouteError(405, f"{method} is not allowed on {scope['path'][:200]}; use {wanted}")


def _token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bearer_token(value.decode("latin-1"))
    return None


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None
