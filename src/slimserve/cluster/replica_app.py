"""What a replica adds around the server's ASGI app: its name on every response and the load
it carries (requests in flight, the oldest one's age), which it publishes to the router and
the autoscaler. No Ray here: the Ray deployment (cluster.ray_replica) wraps its app in this.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slimserve.types import HealthReport, RepositoryEntry

REPLICA_HEADER = b"slimserve-replica"


class ReplicaApp:
    """ASGI middleware: `slimserve-replica: NAME` on every HTTP response; counts in flight."""

    def __init__(self, app: ASGIApp, name: str, clock: Callable[[], float] = time.monotonic):
        self.app, self.name, self.clock = app, name, clock
        self._header = (REPLICA_HEADER, name.encode())
        self._started: dict[int, float] = {}  # in-flight request -> when it arrived
        self._ids = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = next(self._ids)
        self._started[request] = self.clock()

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self._header]}
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


def routing_stats(
    health: HealthReport, ready: list[RepositoryEntry], in_flight: int
) -> dict[str, Any]:
    """What the router reads of one replica (kept to JSON types: Ray ships it as is).
    `health` is Engine.health(), `ready` Engine.repository_index(ready_only=True)."""
    return {
        "resident": sorted({e.name if ":" in e.name else f"{e.name}:" for e in ready}),
        "free_bytes": max(0, health.memory_budget_bytes - health.resident_bytes),
        "queue": in_flight,
    }
