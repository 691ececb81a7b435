"""The HTTP port's one ASGI app: the v2 app, with other apps mounted on path prefixes.

`create_app` mounts the OpenAI API on its /v1/ routes and sends everything else to the KServe
v2 app (transport/http.py). Another app joins with `mount`, before the server starts:

    app = create_app(engine, settings)
    app.mount("/ui", ui_app)        # every path under /ui/ (and /ui itself) goes to ui_app

A mount matches by prefix (`"/ui"` matches "/ui" and "/ui/...", not "/uix") or by a predicate
on the path; the first match wins, in mounting order.
"""

from __future__ import annotations

from collections.abc import Callable

from slimserve.config import Settings
from slimserve.serving.engine import Engine
from slimserve.transport.http import ASGIApp, HttpApp, Receive, Scope, Send, lifespan
from slimserve.transport.limits import TensorLimits
from slimserve.transport.openai import OpenAIApp
from slimserve.transport.ui import ConsoleApp

PathMatch = Callable[[str], bool]


class Router:
    """Sends each HTTP request to the first mounted app whose path matches, else to `default`."""

    def __init__(self, default: ASGIApp) -> None:
        self.default = default
        self._mounts: list[tuple[PathMatch, ASGIApp]] = []

    def mount(self, path: str | PathMatch, app: ASGIApp) -> None:
        """Serve paths under the prefix `path` (or those the predicate accepts) with `app`."""
        if isinstance(path, str):
            prefix = path.rstrip("/")
            self._mounts.append((lambda p: p == prefix or p.startswith(prefix + "/"), app))
        else:
            self._mounts.append((path, app))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        path = scope.get("path", "")
        for matches, app in self._mounts:
            if matches(path):
                await app(scope, receive, send)
                return
        await self.default(scope, receive, send)


def create_app(engine: Engine, settings: Settings) -> Router:
    """The ASGI app serving `engine` over HTTP: KServe v2, the OpenAI API and the web console
    at /ui. Bodies above
    settings.max_body_bytes get a 413, tensors over settings.max_tensor_elements or
    max_string_bytes a 400."""
    router = Router(HttpApp(engine, settings.max_body_bytes, TensorLimits.from_settings(settings)))
    router.mount(OpenAIApp.handles, OpenAIApp(engine, settings.max_body_bytes))
    router.mount("/ui", ConsoleApp(engine))  # the web console (transport/ui)
    return router
