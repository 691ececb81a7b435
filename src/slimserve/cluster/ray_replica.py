"""One Ray Serve replica: a whole slimserve server (engine + HTTP app) built by the same
composition root as `slimserve serve`, served through Ray Serve's ASGI ingress.

The builder is handed in (`build`, normally `slimserve.app.build_server`) rather than
imported, so that the app module, which starts Ray, and this module, which Ray runs, do not
import each other. Ray calls `record_autoscaling_stats` (for cluster.ray_autoscale) on a
timer, and `record_routing_stats` (for cluster.ray_router) again as soon as its last call
returned: each call waits until this replica's residency changes (or a second passes), so a
model loaded or evicted reaches the routers at the next tick of Ray's controller (0.1 s)
rather than at the next timed report.

gRPC does not go through Ray: Ray's gRPC proxy calls one deployment method per RPC with
messages it unpickles, which cannot carry the v2 service as slimserve serves it (its own
HTTP/2 layer, binary tensors). Each replica serves v2 gRPC itself on its node's
settings.host:grpc_port, bound with SO_REUSEPORT so that replicas sharing a node share the
port (the kernel spreads connections over them).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from ray import serve
from starlette.types import ASGIApp

from slimserve.cluster.ray_group import RayLauncher
from slimserve.cluster.ray_metrics import RayMetricsMirror
from slimserve.cluster.replica_app import (
    PrefixIndex,
    ReplicaApp,
    ResidencyReports,
    post_json,
    request_prefixes,
    routing_stats,
)
from slimserve.config import Settings
from slimserve.runtimes.launch import WorkerLauncher
from slimserve.serving.engine import Engine

log = logging.getLogger("slimserve.ray")

# The longest a routing report waits for a residency change; under Ray's
# request_routing_stats_timeout_s (cluster.ray_serve).
ROUTING_REPORT_EVERY_S = 1.0


class GrpcServer(Protocol):
    """A gRPC server as the composition root makes one (slimserve.app.GrpcServer)."""

    async def start(self) -> None: ...
    async def stop(self, grace: float | None) -> None: ...


class BuiltServer(Protocol):
    """What the composition root returns (slimserve.app.Server), as far as a replica uses it."""

    @property
    def engine(self) -> Engine: ...
    @property
    def http_app(self) -> ASGIApp: ...
    @property
    def settings(self) -> Settings: ...

    def grpc_server(self) -> GrpcServer: ...

    async def start(self, wait: bool = False) -> None: ...
    async def stop(self) -> None: ...


class Builder(Protocol):
    """The composition root (slimserve.app.build_server), as far as a replica calls it."""

    def __call__(self, settings: Settings, *, launcher: WorkerLauncher | None) -> BuiltServer: ...


@serve.ingress()
class SlimserveReplica:
    """The deployment class: builds and starts the server, serves its ASGI app."""

    async def __init__(self, settings: dict[str, Any], build: Builder) -> None:  # type: ignore[misc]
        self.name = serve.get_replica_context().replica_id.unique_id
        config = Settings(**settings)
        # A model split over worker processes gets them as Ray actors in a placement group.
        launcher = RayLauncher(config.ray_group_strategy, config.ray_group_cpus)
        self.server = build(config, launcher=launcher)
        await self.server.start(wait=True)  # ready once the startup models are loaded
        self.grpc: GrpcServer | None = None
        if self.server.settings.grpc_port:
            self.grpc = self.server.grpc_server()
            await self.grpc.start()
        self.prefixes = PrefixIndex()  # prompts served through `post`, keys through HTTP
        self.asgi = ReplicaApp(self.server.http_app, self.name, prefixes=self.prefixes)
        self.metrics = RayMetricsMirror()
        self.reports = 0  # routing stats reported so far
        self.residency = ResidencyReports(every_s=ROUTING_REPORT_EVERY_S)
        self.server.engine.models.watch_residency(self.residency.changed)
        self.metrics_at = 0.0  # when Ray's copy of this replica's metrics was last updated
        log.info("replica %s serving", self.name)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.asgi

    async def record_routing_stats(self) -> dict[str, Any]:
        """Called by Ray's controller in a loop (see the module's doc): returns when residency
        changed, or after ROUTING_REPORT_EVERY_S. Also the tick that copies this replica's
        metrics into Ray's (cluster.ray_metrics), at most once a second."""
        await self.residency.wait()
        engine = self.server.engine
        now = time.monotonic()
        if now - self.metrics_at >= 1.0:
            self.metrics_at = now
            self.metrics.update(engine.metrics_text()[0].decode())
        self.reports += 1
        sizes = {
            f"{u.target.model}:{u.target.variant or ''}": u.resident.size_bytes
            for u in engine.models.resident_units()
            if u.resident is not None
        }
        stats = routing_stats(
            engine.health(),
            engine.repository_index(),
            self.asgi.in_flight(),
            self.prefixes.published(),
            self.reports,
            sizes,
        )
        return {**stats, "name": self.name}

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One JSON POST (v2 inference, or an OpenAI call without streaming) made through a Ray
        handle: `handle.post.remote("/v1/completions", {...})`. Unlike a call through Ray's
        HTTP proxy, its body is known when it is routed, so the router can use the prompt's
        prefix (cluster.ray_router). Returns {"status", "body", "replica"}."""
        status, answer = await post_json(self.asgi, path, body)
        if status == 200:
            self.prefixes.add(request_prefixes(path, body))
        return {"status": status, "body": answer, "replica": self.name}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return {"in_flight": self.asgi.in_flight(), "oldest_s": self.asgi.oldest_age_s()}

    async def __del__(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop(grace=2.0)
        await self.server.stop()
