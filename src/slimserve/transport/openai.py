"""The OpenAI API on the HTTP port: models, embeddings, completions, chat, streaming.

Routes (the HTTP app hands these paths here; `handles` says which):
  GET  /v1/models | /v1/models/{id}   the repository's embedding and text-generation models,
                                      each variant too ('NAME:VARIANT', `parent`: NAME)
  POST /v1/embeddings                 `input` str | [str]; `encoding_format` float | base64
  POST /v1/completions                `prompt` str | [str] | token ids | [token ids]
  POST /v1/chat/completions           `messages`, rendered by the tokenizer's chat template

`stream: true` answers `text/event-stream`: each event is exactly `data: <json>\\n\\n`, the
last `data: [DONE]\\n\\n`; an error after the first byte is sent as a data event
`{"error": ...}` and then [DONE]. A client that disconnects mid-stream cancels generation
(its KV blocks are freed at the engine's next iteration). Errors are
`{"error": {"message", "type", "param", "code"}}` with the status from http.STATUS.

Chat takes `response_format` (json_object, json_schema) and `tools` / `tool_choice`,
enforced by constrained decoding (openai_structured.py); completions take `response_format`
too. A field a route does not know is a 400 naming it (openai_requests.FIELDS).

Admission is the v2 routes' (serving/engine.py): the breaker, degradation to a cheaper
variant (headers x-slimserve-variant, x-slimserve-degraded), and the model's response cache
for temperature-0 answers not streamed (x-slimserve-cache: hit | miss).

Protections are the v2 routes': `Authorization: Bearer KEY` with scope `infer` on the model;
the body limit (413 before reading a body that declares too many bytes); max_string_bytes
per prompt, message or input text and max_tensor_elements texts per request (400); rate
limits (429 + Retry-After) and shedding (503 + Retry-After). `timeout` (seconds, also bounded
by model.yaml `parameters.timeout_s`) ends a generation with 504 (an error event once
streaming).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
import orjson

from slimserve.errors import Code, PayloadTooLarge, SlimserveError, Unimplemented
from slimserve.security.keys import bearer_token
from slimserve.serving.engine import Engine
from slimserve.serving.llm import SamplingParams, TextStream
from slimserve.transport import openai_requests as req
from slimserve.transport import openai_structured as structured
from slimserve.transport.controls import LATENCY_SLO_MS, MAX_QUALITY_LOSS, take_controls
from slimserve.transport.http import STATUS
from slimserve.transport.openai_models import models_reply
from slimserve.transport.openai_replies import Chat, Completion, Reply
from slimserve.transport.openai_requests import BadRequest
from slimserve.types import RequestControls

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
_ROUTES = ("/v1/models", "/v1/embeddings", "/v1/completions", "/v1/chat/")


# Fields that change how an answer is delivered, not what it is.
_NOT_IN_CACHE_KEY = frozenset({"stream", "stream_options", "user", "timeout", "metadata", "store"})


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """One generation request as the reply sees it."""

    body: dict[str, Any]
    model: str
    params: SamplingParams
    streaming: bool


def _served_headers(streams: list[TextStream]) -> list[tuple[bytes, bytes]]:
    """Which variant answered, and whether instead of the one asked for (x-slimserve-*);
    with a latency objective, whether it was reachable (streams have no body to say it in)."""
    served = streams[0].served if streams else None
    if served is None:
        return []
    headers = []
    if served.variant is not None:
        headers.append((b"x-slimserve-variant", served.variant.encode()))
    if any(s.served.degraded for s in streams):
        headers.append((b"x-slimserve-degraded", b"true"))
    objective = served.objective or {}
    if "slo_reachable" in objective:
        headers.append(
            (b"x-slimserve-slo-reachable", b"true" if objective["slo_reachable"] else b"false")
        )
    elif objective:
        headers.append((b"x-slimserve-slo-considered", b"false"))
    return headers


def _objective(body: dict[str, Any]) -> RequestControls:
    """The extension fields latency_slo_ms and max_quality_loss, parsed as the v2 parameters
    of the same names (a bad value is a 400 naming the field and the fix)."""
    fields = {k: body[k] for k in (LATENCY_SLO_MS, MAX_QUALITY_LOSS) if body.get(k) is not None}
    return take_controls(fields)[1]


class _RouteError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class OpenAIApp:
    """An ASGI callable for /v1/ paths, mounted by the v2 HTTP app."""

    def __init__(self, engine: Engine, max_body_bytes: int) -> None:
        self.engine = engine
        self.max_body_bytes = max_body_bytes

    @staticmethod
    def handles(path: str) -> bool:
        """Whether `path` is an OpenAI route (others under /v1 get the v2 app's 404)."""
        return path.startswith(_ROUTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._route(scope, receive, send)
        except SlimserveError as exc:
            exc.message = self.engine.public(exc.message)  # no repository paths to clients
            retry = exc.retry_after_s
            extra = [] if retry is None else [(b"retry-after", b"%d" % max(1, math.ceil(retry)))]
            await _send_json(send, STATUS.get(exc.code, 500), error_doc(exc), extra)
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
            await _send_json(
                send, 200, models_reply(self.engine, token, parts[1] if len(parts) == 2 else None)
            )
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
        model = req.model(body)
        identity = self.engine.authorize(token, "infer", model)
        who = identity.client if identity.key_id else client
        await handler(body, model, who, receive, send)

    # -- embeddings ------------------------------------------------------------------------

    async def _embeddings(
        self, body: dict[str, Any], model: str, client: str | None, receive: Receive, send: Send
    ) -> None:
        req.refuse_unsupported(body, "embeddings")
        texts = req.embedding_input(body.get("input"))
        self._check_sizes(texts, "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest(
                f"encoding_format {encoding!r} is not supported; use float or base64",
                "encoding_format",
            )
        if body.get("dimensions") is not None:
            raise BadRequest("dimensions is not supported; leave it out", "dimensions")
        answer = await self.engine.embed(model, texts, client, _objective(body))
        (vectors,) = (np.ascontiguousarray(v, "<f4") for v in answer.outputs.values())
        tokens = self.engine.count_tokens(model, texts)
        data = [
            {"object": "embedding", "index": i, "embedding": req.vector(row, encoding)}
            for i, row in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        reply = {"object": "list", "data": data, "model": answer.served_name, "usage": usage}
        if answer.parameters:  # which variant answered the objective, and whether it could
            reply["slimserve"] = answer.parameters
        await _send_json(send, 200, reply)

    # -- completions -----------------------------------------------------------------------

    async def _completions(
        self, body: dict[str, Any], model: str, client: str | None, receive: Receive, send: Send
    ) -> None:
        io = (receive, send)
        req.refuse_unsupported(body, "completions")
        if body.get("echo"):
            raise BadRequest("echo is not supported; leave it out or set it to false", "echo")
        if body.get("best_of") not in (None, 1, body.get("n", 1)):
            raise BadRequest("best_of is not supported; leave it out", "best_of")
        stream_opts = req.stream_options(body)
        params = req.sampling(body, chat=False)
        params = dataclasses.replace(params, grammar=structured.response_format(body))
        prompts = req.prompts(body.get("prompt"))
        self._check_sizes(prompts, "prompt")
        reply = Completion(model, params.n, stream_opts is not None and stream_opts)

        controls = _objective(body)

        def submit() -> Awaitable[list[TextStream]]:
            return self._submit_all(model, params, client, prompts, (req.timeout(body), controls))

        await self._respond(Answer(body, model, params, stream_opts is not None), submit, reply, io)

    async def _chat(
        self, body: dict[str, Any], model: str, client: str | None, receive: Receive, send: Send
    ) -> None:
        io = (receive, send)
        req.refuse_unsupported(body, "chat")
        stream_opts = req.stream_options(body)
        plan = structured.plan(body)
        params = dataclasses.replace(req.sampling(body, chat=True), grammar=plan.grammar)
        messages = req.messages(body.get("messages"))
        self._check_sizes([m["content"] for m in messages], "messages")
        messages = structured.with_tools(messages, plan)
        unset = body.get("max_completion_tokens") is None and body.get("max_tokens") is None
        reply = Chat(model, params.n, stream_opts is not None and stream_opts, plan)
        controls = _objective(body)

        async def submit() -> list[TextStream]:
            stream = await self.engine.generate(
                model,
                params,
                messages=messages,
                fill_max_tokens=unset,
                deadline_s=req.timeout(body),
                client=client,
                controls=controls,
            )
            return [stream]

        await self._respond(Answer(body, model, params, stream_opts is not None), submit, reply, io)

    async def _respond(
        self,
        answer: Answer,
        submit: Callable[[], Awaitable[list[TextStream]]],
        reply: Reply,
        io: tuple[Receive, Send],
    ) -> None:
        """Stream, or collect into one JSON body: through the model's response cache where
        the answer is deterministic (temperature 0, not streamed)."""
        receive, send = io
        if answer.streaming:
            streams = await submit()
            await _stream(send, receive, reply.chunks(streams), _served_headers(streams))
            return
        headers: list[tuple[bytes, bytes]] = []

        async def compute() -> tuple[bytes, bool]:
            streams = await submit()
            doc = await reply.collect(streams)
            objective = streams[0].served.objective if streams else None
            if objective is not None:  # as on /v1/embeddings: which unit, and could it
                doc["slimserve"] = objective
            headers.extend(_served_headers(streams))
            return orjson.dumps(doc), not any(s.served.degraded for s in streams)

        if not answer.params.greedy:
            await _send_body(send, 200, (await compute())[0], headers)
            return
        key = {k: v for k, v in answer.body.items() if k not in _NOT_IN_CACHE_KEY}
        data, hit = await self.engine.cached_reply(answer.model, key, compute)
        if hit:  # the same answer, under this request's own id and time
            doc = orjson.loads(data)
            doc.update(reply.head(doc["object"]))
            data = orjson.dumps(doc)
        headers.append((b"x-slimserve-cache", b"hit" if hit else b"miss"))
        await _send_body(send, 200, data, headers)

    def _check_sizes(self, items: list[Any], param: str) -> None:
        settings = self.engine.settings
        req.check_sizes(items, param, settings.max_string_bytes, settings.max_tensor_elements)

    async def _submit_all(
        self,
        model: str,
        params: SamplingParams,
        client: str | None,
        prompts: list[Any],
        limits: tuple[float | None, RequestControls],
    ) -> list[TextStream]:
        """One engine request per prompt (`limits`: its deadline and objective); if one is
        refused, the others are cancelled."""
        deadline_s, controls = limits
        streams: list[TextStream] = []
        try:
            for prompt in prompts:
                streams.append(
                    await self.engine.generate(
                        model,
                        params,
                        prompt=prompt,
                        deadline_s=deadline_s,
                        client=client,
                        controls=controls,
                    )
                )
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        return streams

    # -- bodies ----------------------------------------------------------------------------

    async def _body(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        """The JSON body; 413 before reading a body that declares too many bytes, or as soon
        as a chunked one passes the limit."""
        _check_headers(scope, self.max_body_bytes)
        chunks, size = [], 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _too_large(size, self.max_body_bytes)
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


def _check_headers(scope: Scope, limit: int) -> None:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise _too_large(int(value), limit)
        if name == b"content-encoding" and value.lower() != b"identity":
            raise Unimplemented(
                f"Content-Encoding {value.decode('latin-1')[:40]!r} is not supported; send "
                "the request body uncompressed"
            )


def _too_large(size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body ({size} bytes or more) is over the limit of {limit} bytes; "
        "send a smaller request or raise --max-body-bytes"
    )


# -- sending -------------------------------------------------------------------------------


async def _stream(
    send: Send,
    receive: Receive,
    chunks: AsyncIterator[dict[str, Any]],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send `chunks` as server-sent events; a disconnect cancels the generation."""
    await send({"type": "http.response.start", "status": 200, "headers": _SSE + (headers or [])})
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
    except Exception:
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


async def _send_json(
    send: Send, status: int, doc: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _send_body(send, status, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), extra)


async def _send_body(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [*_JSON, (b"content-length", b"%d" % len(body)), *(extra or [])]
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
