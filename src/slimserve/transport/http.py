"""KServe v2 over HTTP as a bare ASGI app, run by uvicorn (httptools + uvloop).

No web framework on the hot path: the raw path is split once and matched by hand, the body is
read with a size cap, `http_codec` turns bytes into tensors and back, and every response is one
`http.response.start` plus one `http.response.body` with a Content-Length. (uvicorn writes the
two as two socket writes; uvloop and asyncio set TCP_NODELAY on every TCP connection, so the
second write is not held back by Nagle's algorithm waiting for a delayed ACK.)

Routes (Triton's spelling where the KServe spec has none):
  GET  /v2                                   server metadata
  GET  /v2/health/live | /v2/health/ready    200 or 503, {"live": bool} / {"ready": bool}
  GET  /v2/health/status                     degraded states (open breakers, failed units)
  GET  /v2/models/stats                      statistics of every model
  GET  /v2/models/{m}[/versions/{v}]         model metadata
  GET  .../ready | .../config | .../stats    readiness, Triton-style config, statistics
  POST .../infer                             inference (JSON or binary tensors)
  POST /v2/repository/index                  repository index ({"ready": true} to filter)
  POST /v2/repository/models/{m}/load | /unload
  GET  /metrics                              Prometheus exposition of the engine's metrics
  GET  /v2/openapi.json                      this API's OpenAPI 3.1 description (no key)
A model name may carry a variant: /v2/models/mlp:int8/infer. Errors are {"error": "..."}
with the status from `STATUS`.

With API keys (--api-keys-file), every route but health needs `Authorization: Bearer KEY`
with the scope named in its `_allow` call (the same scopes as the gRPC transport): `infer`
for inference, metadata, config and the index; `metrics` for statistics and /metrics;
`manage` for load and unload.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

import orjson

from slimserve.errors import (
    Code,
    InvalidArgument,
    PayloadTooLarge,
    SlimserveError,
    Unimplemented,
)
from slimserve.logs import request_id
from slimserve.security.keys import Identity, bearer_token
from slimserve.serving.engine import Engine
from slimserve.transport import v2_shapes as shapes
from slimserve.transport.http_codec import (
    decode_infer_request,
    encode_infer_response,
    parse_header_length,
    parse_json,
)
from slimserve.transport.limits import TensorLimits, check_inputs
from slimserve.transport.openapi import openapi_bytes

log = logging.getLogger("slimserve.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

# The one table from error codes to HTTP statuses.
STATUS: dict[Code, int] = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.FAILED_PRECONDITION: 400,
    Code.UNAVAILABLE: 503,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.PAYLOAD_TOO_LARGE: 413,
    Code.DEADLINE_EXCEEDED: 504,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
}

_JSON = (b"content-type", b"application/json")
_BINARY = (b"content-type", b"application/octet-stream")
_CLOSE = (b"connection", b"close")
_EMPTY_OBJECT = b"{}"
_MODEL_GETS = frozenset(["", "ready", "config", "stats"])


class HttpError(Exception):
    """An HTTP-level failure (no route, wrong method, client gone) with its status."""

    def __init__(self, status: int, message: str, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class _Disconnected(Exception):
    """The client went away before its body arrived; nothing is sent."""


class _Request:
    """The parts of an ASGI scope a handler needs, headers scanned once."""

    __slots__ = (
        "authorization",
        "client",
        "content_length",
        "encoding",
        "header_length",
        "method",
        "path",
        "receive",
        "request_id",
    )

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.receive = receive
        self.content_length: int | None = None
        self.header_length: bytes | None = None
        self.request_id: bytes | None = None
        self.encoding: bytes | None = None
        self.authorization: bytes | None = None
        client = scope.get("client")
        self.client: str | None = client[0] if client else None  # peer host, for rate limits
        for name, value in scope["headers"]:
            if name == b"content-length":
                self.content_length = int(value) if value.isdigit() else None
            elif name == b"inference-header-content-length":
                self.header_length = value
            elif name == b"x-request-id":
                self.request_id = value
            elif name == b"content-encoding" and value.lower() != b"identity":
                self.encoding = value
            elif name == b"authorization":
                self.authorization = value

    @property
    def token(self) -> str | None:
        """The API key of an `Authorization: Bearer KEY` header (never logged)."""
        if self.authorization is None:
            return None
        return bearer_token(self.authorization.decode("latin-1"))


Reply = tuple[int, bytes, Headers]


class HttpApp:
    """The KServe v2 routes (the HTTP port's default app; transport/asgi.py mounts others)."""

    def __init__(
        self, engine: Engine, max_body_bytes: int, limits: TensorLimits | None = None
    ) -> None:
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.limits = limits or TensorLimits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await lifespan(receive, send)
        # Anything else (websocket) is not served: returning unaccepted makes the server refuse.

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = _Request(scope, receive)
        if request.request_id is not None:  # log lines made while serving it carry the id
            request_id.set(request.request_id[:128].decode("latin-1"))
        try:
            status, body, headers = await self._route(request, _segments(scope))
        except SlimserveError as exc:
            exc.message = self.engine.public(exc.message)
            status, body, headers = _error_reply(exc)
        except HttpError as exc:
            status, body, headers = exc.status, _error_body(exc.message), [_JSON, *exc.headers]
        except _Disconnected:
            return
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path[:200])
            status, body, headers = 500, _error_body("internal server error; see the log"), [_JSON]
        if request.request_id is not None:
            headers.append((b"x-request-id", request.request_id))
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- routing ---------------------------------------------------------------------------

    def _allow(self, request: _Request, scope: str, model: str | None = None) -> Identity:
        return self.engine.authorize(request.token, scope, model)

    async def _route(self, request: _Request, parts: list[str]) -> Reply:
        if parts == ["metrics"]:
            _expect(request, "GET")
            self._allow(request, "metrics")
            text, content_type = self.engine.metrics_text()
            return 200, text, [(b"content-type", content_type.encode())]
        if not parts or parts[0] != "v2":
            raise _no_route(request)
        if len(parts) == 1:
            _expect(request, "GET")
            self._allow(request, "infer")
            return _json(shapes.server_metadata_doc(self.engine.server_metadata()))
        section, rest = parts[1], parts[2:]
        if section == "openapi.json" and not rest:
            _expect(request, "GET")  # no key needed: it describes the protocol, not the models
            return 200, openapi_bytes(), [_JSON]
        if section == "models" and rest:
            return await self._models(request, rest)
        if section == "health" and len(rest) == 1:
            return self._health(request, rest[0])
        if section == "repository" and rest:
            return await self._repository(request, rest)
        raise _no_route(request)

    def _health(self, request: _Request, which: str) -> Reply:
        if which == "status":  # what is degraded and why: names models, so it needs a key
            _expect(request, "GET")
            self._allow(request, "metrics")
            return _json(shapes.health_doc(self.engine.health()), 200)
        if which == "live":
            ok = self.engine.live()
        elif which == "ready":
            ok = self.engine.ready()
        else:
            raise _no_route(request)
        _expect(request, "GET")
        return _json({which: ok}, 200 if ok else 503)

    async def _models(self, request: _Request, rest: list[str]) -> Reply:
        if rest == ["stats"]:
            _expect(request, "GET")
            self._allow(request, "metrics")
            return _json(shapes.statistics_doc(self.engine.model_statistics()))
        name, rest = rest[0], rest[1:]
        version = None
        if rest and rest[0] == "versions":
            if len(rest) < 2:
                raise _no_route(request)
            version, rest = rest[1], rest[2:]
        if len(rest) > 1:
            raise _no_route(request)
        action = rest[0] if rest else ""
        if action == "infer":
            _expect(request, "POST")
            return await self._infer(request, name, version)
        if action not in _MODEL_GETS:
            raise _no_route(request)
        _expect(request, "GET")
        self._allow(request, "metrics" if action == "stats" else "infer", name)
        return self._model_get(action, name, version)

    def _model_get(self, action: str, name: str, version: str | None) -> Reply:
        engine = self.engine
        if action == "":
            return _json(shapes.model_metadata_doc(engine.model_metadata(name, version)))
        if action == "ready":
            ready = engine.model_ready(name, version)
            return _json({"name": name, "ready": ready}, 200 if ready else 503)
        if action == "config":
            return _json(shapes.model_config_doc(engine.model_config(name, version)))
        return _json(shapes.statistics_doc(engine.model_statistics(name, version)))

    async def _infer(self, request: _Request, name: str, version: str | None) -> Reply:
        identity = self._allow(request, "infer", name)  # before the body is read
        body = await self._read_body(request)
        header_length = parse_header_length(request.header_length, len(body))
        infer_request, fmt = decode_infer_request(body, name, version, header_length)
        check_inputs(infer_request.inputs, self.limits)
        infer_request.client = identity.client if identity.key_id else request.client
        response = await self.engine.infer(infer_request)
        payload, json_length = encode_infer_response(response, fmt)
        if json_length is None:
            return 200, payload, [_JSON]
        return 200, payload, [_BINARY, (b"inference-header-content-length", b"%d" % json_length)]

    async def _repository(self, request: _Request, rest: list[str]) -> Reply:
        if rest == ["index"]:
            _expect(request, "POST")
            self._allow(request, "infer")
            options = await self._json_body(request, "repository index request")
            ready_only = options.get("ready", False)
            if type(ready_only) is not bool:
                raise InvalidArgument("'ready' in the index request must be true or false")
            return _json(shapes.index_doc(self.engine.repository_index(ready_only)))
        if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
            _expect(request, "POST")
            identity = self._allow(request, "manage")
            options = await self._json_body(request, f"{rest[2]} request")
            if rest[2] == "load":
                _refuse_load_overrides(options)
                await self.engine.load_model(rest[1], identity)
            else:
                await self.engine.unload_model(rest[1], identity)
            return 200, _EMPTY_OBJECT, [_JSON]
        raise _no_route(request)

    # -- bodies ----------------------------------------------------------------------------

    async def _read_body(self, request: _Request) -> bytes | bytearray:
        """The whole body, refused with 413 before reading when it declares too many bytes,
        or as soon as a chunked body passes the limit."""
        if request.encoding is not None:
            raise Unimplemented(
                f"Content-Encoding {request.encoding.decode('latin-1')[:40]!r} is not "
                "supported; send the request body uncompressed"
            )
        limit = self.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(request.content_length, limit)
        message = await request.receive()
        if message["type"] != "http.request":
            raise _Disconnected
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):  # the usual case: one chunk, no copy
            return body
        buffer = bytearray(body)
        while message.get("more_body", False):
            if len(buffer) > limit:
                raise _too_large(len(buffer), limit)
            message = await request.receive()
            if message["type"] != "http.request":
                raise _Disconnected
            buffer += message.get("body", b"")
        if len(buffer) > limit:
            raise _too_large(len(buffer), limit)
        return buffer

    async def _json_body(self, request: _Request, what: str) -> dict[str, Any]:
        """An optional JSON object body (empty: {})."""
        body = await self._read_body(request)
        if not body.strip():
            return {}
        doc = parse_json(body, what)
        if not isinstance(doc, dict):
            raise InvalidArgument(f"the {what} must be a JSON object")
        return doc


# -- helpers -------------------------------------------------------------------------------


def _segments(scope: Scope) -> list[str]:
    """Path segments, split on the raw path before percent-decoding (so %2F stays inside
    a segment), without the leading '' and one trailing '' ('/v2/models/m/' works)."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    text = raw.split(b"?", 1)[0].decode("latin-1")
    parts = text.split("/")[1:]
    if parts and parts[-1] == "" and len(parts) > 1:
        parts.pop()
    return [unquote(p, errors="replace") if "%" in p else p for p in parts]


def _json(doc: Any, status: int = 200) -> Reply:
    return status, orjson.dumps(doc), [_JSON]


def _error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def _error_reply(exc: SlimserveError) -> Reply:
    headers: Headers = [_JSON]
    if exc.retry_after_s is not None:
        headers.append((b"retry-after", b"%d" % max(1, math.ceil(exc.retry_after_s))))
    if exc.code is Code.UNAUTHENTICATED:
        headers.append((b"www-authenticate", b'Bearer realm="slimserve"'))
    if exc.code is Code.PAYLOAD_TOO_LARGE:
        # The rest of the body is not read: close the connection rather than drain it.
        headers.append(_CLOSE)
    return STATUS.get(exc.code, 500), _error_body(exc.message), headers


def _expect(request: _Request, method: str) -> None:
    if request.method != method:
        raise HttpError(
            405,
            f"{request.method} is not allowed on {request.path[:200]}; use {method}",
            [(b"allow", method.encode())],
        )


def _no_route(request: _Request) -> HttpError:
    return HttpError(
        404,
        f"no such endpoint: {request.method} {request.path[:200]!r}; the KServe v2 API is "
        "under /v2 (e.g. GET /v2/models/NAME, POST /v2/models/NAME/infer)",
    )


def _too_large(size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body has {size} bytes (or more), over the limit of {limit} bytes; "
        "send smaller requests or raise --max-body-bytes"
    )


def _refuse_load_overrides(options: dict[str, Any]) -> None:
    params = options.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' of the load request must be a JSON object")
    overrides = [k for k in params if k == "config" or k.startswith("file:")]
    if overrides:
        raise Unimplemented(
            f"load parameter {overrides[0]!r} (a config or file override) is not supported; "
            "edit model.yaml in the repository and load again"
        )


async def lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge startup and shutdown; the engine's life is managed by slimserve.app."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
