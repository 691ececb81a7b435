"""What a replica adds around the server's ASGI app: its name on every response and the load
it carries (requests in flight, the oldest one's age), which it publishes to the router and
the autoscaler; the prompts it served (as prefix hashes) and the affinity keys of the HTTP
requests it answered (the `slimserve-prefix-key` header), for prefix affinity; and one JSON
POST through the app, for calls that come through a Ray handle rather than Ray's HTTP proxy.
No Ray here: the Ray deployment (cluster.ray_replica) wraps its app in this.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slimserve.policies.routing import prefix_hashes, prefix_key_hash
from slimserve.types import HealthReport, RepositoryEntry

REPLICA_HEADER = b"slimserve-replica"
# A client's affinity key for calls through Ray's HTTP proxy, which routes before it reads the
# body (so before the prompt is known): requests with the same key go to the same replica.
PREFIX_KEY_HEADER = b"slimserve-prefix-key"


class ReplicaApp:
    """ASGI middleware: `slimserve-replica: NAME` on every HTTP response; counts in flight;
    the affinity key (PREFIX_KEY_HEADER) of each request answered 200 goes into `prefixes`."""

    def __init__(
        self,
        app: ASGIApp,
        name: str,
        clock: Callable[[], float] = time.monotonic,
        prefixes: PrefixIndex | None = None,
    ) -> None:
        self.app, self.name, self.clock, self.prefixes = app, name, clock, prefixes
        self._header = (REPLICA_HEADER, name.encode())
        self._started: dict[int, float] = {}  # in-flight request -> when it arrived
        self._ids = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = next(self._ids)
        self._started[request] = self.clock()
        key = _header(scope, PREFIX_KEY_HEADER) if self.prefixes is not None else None

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self._header]}
                if key and self.prefixes is not None and message["status"] == 200:
                    self.prefixes.add(key_prefixes(key))
            await send(message)

        try:
            await self.app(scope, receive, send_named)
        finally:
            del self._started[request]

    def in_flight(self) -> int:
        return len(self._started)

    def oldest_age_s(self) -> float:
        """How long the oldest request in flight has been in this replica (0: none)."""
        return self.clock() - min(self._started.values()) if self._started else 0.0


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case, as ASGI servers give names)."""
    return next((value for key, value in scope.get("headers", ()) if key == name), None)


RESIDENT_STATES = ("READY", "LOADING")  # a unit loading now is resident for routing


def routing_stats(
    health: HealthReport,
    units: list[RepositoryEntry],
    in_flight: int,
    prefixes: Iterable[str] = (),
    seq: int = 0,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """What the router reads of one replica (kept to JSON types: Ray ships it as is).
    `health` is Engine.health(), `units` Engine.repository_index(), `prefixes`
    PrefixIndex.published(), `sizes` the resident bytes of each loaded "model:variant" (the
    router learns how much room a cold model needs from them); `seq` counts the replica's
    reports."""
    resident = {e.name for e in units if e.state in RESIDENT_STATES}
    return {
        "resident": sorted(n if ":" in n else f"{n}:" for n in resident),
        "free_bytes": max(0, health.memory_budget_bytes - health.resident_bytes),
        "queue": in_flight,
        "prefixes": list(prefixes),
        "seq": seq,
        "sizes": dict(sizes or {}),
    }


class ResidencyReports:
    """When a replica reports its routing stats: as soon as its residency changed (a model
    started loading, became ready, failed, or was evicted), else every `every_s` (for the
    queue depth and prefixes). `changed` is the engine's residency watcher; `wait` is what
    each report awaits. Starts changed, so the first report goes at once."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._changed = asyncio.Event()
        self._changed.set()

    def changed(self) -> None:
        self._changed.set()

    async def wait(self) -> bool:
        """Until a change since the last wait (True) or `every_s` without one (False)."""
        try:
            await asyncio.wait_for(self._changed.wait(), self.every_s)
        except TimeoutError:
            return False
        self._changed.clear()
        return True


OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions")


def prompt_text(path: str, body: Mapping[str, Any]) -> str | None:
    """The text a language-model call's KV cache is built from, the same on the replica and in
    the router (both hash it with policies.routing.prefix_hashes); None for other calls."""
    if path == "/v1/completions":
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else None
    if path == "/v1/chat/completions" and isinstance(body.get("messages"), list):
        turns = [m for m in body["messages"] if isinstance(m, dict)]
        return "".join(f"<{m.get('role')}>{m.get('content')}\n" for m in turns)
    return None


def request_prefixes(path: str, body: Mapping[str, Any]) -> tuple[str, ...]:
    """The prefix hashes of a language-model call's prompt (none for other calls)."""
    text = prompt_text(path, body)
    return prefix_hashes(text) if text else ()


def key_prefixes(key: bytes) -> tuple[str, ...]:
    """The prefix hash of a PREFIX_KEY_HEADER value, the same on a replica and in the router."""
    return (prefix_key_hash(key),) if key else ()


class PrefixIndex:
    """The prefix hashes of the prompts a replica served most recently (at most `size`): what
    its LLM engine's prefix cache most likely still holds. An approximation of the cache
    itself, which is kept in token blocks the router cannot compute without the tokenizer."""

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._hashes: OrderedDict[str, None] = OrderedDict()

    def add(self, hashes: Iterable[str]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.size:
            self._hashes.popitem(last=False)

    def published(self) -> list[str]:
        return list(self._hashes)


async def post_json(app: ASGIApp, path: str, body: Mapping[str, Any]) -> tuple[int, Any]:
    """POST `body` as JSON to `path` of `app` in-process: (status, decoded JSON answer)."""
    payload = orjson.dumps(body)
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", str(len(payload)).encode())],
        "client": None, "server": None,
    }  # fmt: skip
    sent = [False]
    status, chunks = [500], list[bytes]()

    async def receive() -> Message:
        if sent[0]:
            return {"type": "http.disconnect"}
        sent[0] = True
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status[0] = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status[0], orjson.loads(b"".join(chunks) or b"null")
