"""One Ray Serve replica: a whole slimserve server (engine + HTTP app) built by the same
composition root as `slimserve serve`, served through Ray Serve's ASGI ingress.

The builder is handed in (`build`, normally `slimserve.app.build_server`) rather than
imported, so that the app module, which starts Ray, and this module, which Ray runs, do not
import each other. Ray calls `record_routing_stats` (for cluster.ray_router) and
`record_autoscaling_stats` (for cluster.ray_autoscale) on a timer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from ray import serve
from starlette.types import ASGIApp

from slimserve.cluster.ray_metrics import RayMetricsMirror
from slimserve.cluster.replica_app import ReplicaApp, routing_stats
from slimserve.config import Settings
from slimserve.serving.engine import Engine

log = logging.getLogger("slimserve.ray")


class BuiltServer(Protocol):
    """What the composition root returns (slimserve.app.Server), as far as a replica uses it."""

    @property
    def engine(self) -> Engine: ...
    @property
    def http_app(self) -> ASGIApp: ...

    async def start(self, wait: bool = False) -> None: ...
    async def stop(self) -> None: ...


Builder = Callable[[Settings], BuiltServer]


@serve.ingress()
class SlimserveReplica:
    """The deployment class: builds and starts the server, serves its ASGI app."""

    async def __init__(self, settings: dict[str, Any], build: Builder) -> None:  # type: ignore[misc]
        self.name = serve.get_replica_context().replica_id.unique_id
        self.server = build(Settings(**settings))
        await self.server.start(wait=True)  # ready once the startup models are loaded
        self.asgi = ReplicaApp(self.server.http_app, self.name)
        self.metrics = RayMetricsMirror()
        log.info("replica %s serving", self.name)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.asgi

    def record_routing_stats(self) -> dict[str, Any]:
        """Called by Ray every second or so; also the tick that copies this replica's metrics
        into Ray's (cluster.ray_metrics)."""
        engine = self.server.engine
        self.metrics.update(engine.metrics_text()[0].decode())
        stats = routing_stats(
            engine.health(), engine.repository_index(ready_only=True), self.asgi.in_flight()
        )
        return {**stats, "name": self.name}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"in_flight": self.asgi.in_flight(), "oldest_s": self.asgi.oldest_age_s()}

    async def __del__(self) -> None:
        await self.server.stop()
