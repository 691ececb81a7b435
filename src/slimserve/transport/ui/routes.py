"""The console as an ASGI app mounted on /ui (transport/asgi.py): GET only; errors get the
status of the HTTP transport's one table and its {"error": "..."} body, so a missing key is the
same 401 as everywhere."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import Any

import orjson

from slimserve.errors import Code, NotFound, SlimserveError
from slimserve.security.keys import Identity, bearer_token
from slimserve.serving.engine import Engine
from slimserve.transport.http import STATUS, Headers, Receive, Reply, Scope, Send
from slimserve.transport.ui.reports import list_reports, plot_bytes

log = logging.getLogger("slimserve.ui")

# Only files of this package, from this list, are served: no path from the URL reaches the disk.
_STATIC = {
    "index.html": b"text/html; charset=utf-8",
    "console.css": b"text/css; charset=utf-8",
    "uPlot.min.css": b"text/css; charset=utf-8",
    "uPlot.iife.min.js": b"text/javascript; charset=utf-8",
    "uPlot.LICENSE": b"text/plain; charset=utf-8",
    "favicon.svg": b"image/svg+xml",
    "api.js": b"text/javascript; charset=utf-8",
    "main.js": b"text/javascript; charset=utf-8",
    "models.js": b"text/javascript; charset=utf-8",
    "pareto.js": b"text/javascript; charset=utf-8",
    "live.js": b"text/javascript; charset=utf-8",
    "tryit.js": b"text/javascript; charset=utf-8",
    "reports.js": b"text/javascript; charset=utf-8",
}

# No inline script or style, nothing from another origin, no framing; images may be blob: URLs
# (report plots are fetched with the key, then shown). uPlot sizes its canvas through the
# CSSOM (element.style), which style-src does not restrict.
CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Headers = [
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_NO_STORE = (b"cache-control", b"no-store")
_JSON = (b"content-type", b"application/json")
_PNG = (b"content-type", b"image/png")


class ConsoleApp:
    """The ASGI app of every path under /ui."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.console = Console(engine)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # websockets are refused, as on every other path
        status, body, headers = await self._reply(scope)
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _reply(self, scope: Scope) -> Reply:
        if scope["method"] != "GET":
            message = f"{scope['method']} is not allowed on {scope['path'][:200]}; use GET"
            return 405, _error_body(message), [_JSON, (b"allow", b"GET"), *SECURITY_HEADERS]
        parts = scope["path"].split("/")[2:]  # after '', 'ui'
        try:
            return await self.console.get(parts, _token(scope))
        except SlimserveError as exc:
            return _error_reply(self.engine.public(exc.message), exc.code)
        except Exception:
            log.exception("unhandled error answering GET %s", scope["path"][:200])
            return _error_reply("internal server error; see the log", Code.INTERNAL)


class Console:
    """GET /ui/...: `parts` are the path segments after 'ui'."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        folder = resources.files(__package__) / "static"
        self._files = {name: (folder / name).read_bytes() for name in _STATIC}

    async def get(self, parts: list[str], token: str | None) -> Reply:
        if not parts or parts == [""]:  # /ui or /ui/
            return self._static("index.html")
        if parts[0] == "static" and len(parts) == 2:
            return self._static(parts[1])
        if parts[0] == "api" and len(parts) >= 2:
            return await self._api(parts[1:], token)
        raise _no_route(parts)

    def _static(self, name: str) -> Reply:
        body = self._files.get(name)
        if body is None:
            raise NotFound(f"the console has no file {name[:64]!r}")
        headers = [(b"content-type", _STATIC[name]), (b"cache-control", b"no-cache")]
        return 200, body, headers + SECURITY_HEADERS

    async def _api(self, parts: list[str], token: str | None) -> Reply:
        engine = self.engine
        what = parts[0]
        if what == "session" and len(parts) == 1:
            return _json(_session(engine.identify(token), engine))
        if what == "models" and len(parts) == 1:
            identity = engine.authorize(token, "infer")
            return _json(engine.overview(identity))
        if what == "live" and len(parts) == 1:
            identity = engine.authorize(token, "metrics")
            return _json(engine.live_metrics(identity))
        if what == "reports" and len(parts) == 1:
            identity = engine.authorize(token, "metrics")
            # Reports are files: read off the event loop.
            found = await asyncio.to_thread(list_reports, engine.repository, identity.may_use)
            return _json(found)
        if what == "reports" and len(parts) == 4 and parts[3] == "plot":
            engine.authorize(token, "metrics", parts[1])
            body = await asyncio.to_thread(plot_bytes, engine.repository, parts[1], parts[2])
            return 200, body, [_PNG, _NO_STORE, *SECURITY_HEADERS]
        raise _no_route(["api", *parts])


def _session(identity: Identity, engine: Engine) -> dict[str, Any]:
    return {
        "name": identity.name,
        "scopes": sorted(identity.scopes),
        "models": sorted(identity.models) if identity.models is not None else None,
        "keys_required": identity.key_id != "",
        "model_control": engine.settings.model_control,
    }


def _json(doc: Any) -> Reply:
    # orjson encodes the engine's dataclasses as they are (no asdict copy); non-finite floats
    # (the +Inf histogram bucket) become null.
    return (
        200,
        orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
        [
            _JSON,
            _NO_STORE,
            *SECURITY_HEADERS,
        ],
    )


def _token(scope: Scope) -> str | None:
    """The API key of an `Authorization: Bearer KEY` header (never logged)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bearer_token(value.decode("latin-1"))
    return None


def _error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def _error_reply(message: str, code: Code) -> Reply:
    headers = [_JSON, _NO_STORE, *SECURITY_HEADERS]
    if code is Code.UNAUTHENTICATED:
        headers.append((b"www-authenticate", b'Bearer realm="slimserve"'))
    return STATUS.get(code, 500), _error_body(message), headers


def _no_route(parts: list[str]) -> NotFound:
    shown = "/".join(parts)[:200]
    return NotFound(
        f"no such console path: /ui/{shown}; the console is at GET /ui and its data under "
        "/ui/api/(session|models|live|reports)"
    )
