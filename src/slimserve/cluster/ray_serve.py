"""`slimserve serve --ray local|ADDRESS`: run the server as a Ray Serve application.

Each replica is a whole slimserve server (cluster.ray_replica) behind Ray's HTTP proxy, which
listens on --host:--http-port; requests are routed by slimserve's model-aware router
(cluster.ray_router) and the replica count follows --replicas or, with --autoscale MIN,MAX,
slimserve's own load signals (cluster.ray_autoscale). This process is the driver: it starts
(`local`) or joins (ADDRESS) a Ray cluster, deploys, and on SIGINT/SIGTERM deletes the
application (and, when it started Ray, stops Ray).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import (
    AutoscalingConfig,
    AutoscalingPolicy,
    HTTPOptions,
    RequestRouterConfig,
)

from slimserve.cluster.ray_replica import Builder, SlimserveReplica
from slimserve.config import Settings

log = logging.getLogger("slimserve.ray")

APP_NAME = "slimserve"
ROUTER = "slimserve.cluster.ray_router:SlimserveRouter"
AUTOSCALE_POLICY = "slimserve.cluster.ray_autoscale:scale"
MAX_ONGOING = 64  # requests one replica takes at once; more wait at the proxy's router


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Ray Serve options of the slimserve deployment for these settings."""
    options: dict[str, Any] = {
        # Named after the router: Ray's proxy keeps a deployment's handle, and the router
        # object in it, across a delete and redeploy of the same name (ray.serve's
        # get_proxy_handle), so a redeploy with the other --ray-router would still be routed
        # by the first one.
        "name": "SlimserveReplica" + ("" if settings.ray_router == "slimserve" else "RayRouter"),
        "max_ongoing_requests": MAX_ONGOING,
        # One CPU each, so that replicas spread over nodes as the cluster has CPUs for them.
        "ray_actor_options": {"num_cpus": 1},
        # Each routing report waits in the replica for a residency change (cluster.ray_replica),
        # so a short period means "ask again as soon as the last one answered", not "every 0.1 s".
        "request_router_config": RequestRouterConfig.model_validate(
            {"request_routing_stats_period_s": 0.1, "request_routing_stats_timeout_s": 5.0}
            | ({"request_router_class": ROUTER} if settings.ray_router == "slimserve" else {})
        ),
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
        "graceful_shutdown_timeout_s": 10.0,
    }
    bounds = settings.autoscale_range()
    if bounds is None:
        options["num_replicas"] = settings.replicas
    else:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=bounds[0],
            max_replicas=bounds[1],
            initial_replicas=max(bounds[0], 1),
            target_ongoing_requests=8,
            # From a load step to the decision: the replica's next sample of its metrics
            # (every 0.2 x look_back_period_s), its next push (metrics_interval_s), then
            # upscale_delay_s of wanting more. The look-back window is aggregated by its max:
            # a step counts from its first sample rather than once the window's mean has
            # crossed the target. Measured 7.0 s from the step to the decision with
            # 1 s / 3 s mean / 3 s before (benchmarks/RESULTS.md, issue 11); the rest is Ray
            # starting the replica.
            upscale_delay_s=1.0,
            downscale_delay_s=10.0,
            metrics_interval_s=0.5,
            look_back_period_s=2.0,
            aggregation_function="max",
            policy=AutoscalingPolicy(policy_function=AUTOSCALE_POLICY),
        )
    return options


def deploy(settings: Settings, build: Builder) -> None:
    """Start Serve's HTTP proxy on settings' host and port and deploy (Ray must be running).

    gRPC is not carried by Ray's gRPC proxy (it calls one deployment method per RPC with Ray's
    own context object, while slimserve's v2 gRPC service is its own HTTP/2 server): each
    replica listens on its node's --grpc-port itself (cluster.ray_replica; README, scale-out)."""
    if settings.grpc_port:
        log.info("v2 gRPC: every replica on its node's %s:%s", settings.host, settings.grpc_port)
    serve.start(
        http_options=HTTPOptions(
            host=settings.host, port=settings.http_port, keep_alive_timeout_s=settings.keep_alive_s
        ),
        proxy_location="HeadOnly" if settings.ray_proxy == "head" else "EveryNode",
    )
    serve.run(application(settings, build), name=APP_NAME, route_prefix="/", blocking=False)


def application(settings: Settings, build: Builder) -> Application:
    """The Ray Serve application: the slimserve deployment bound to its settings and builder
    (what `serve.run` deploys, and what a RayService's import_path names)."""
    replica = serve.deployment(**deployment_options(settings))(SlimserveReplica)
    return replica.bind(settings.model_dump(mode="json"), build)


def run_on_ray(settings: Settings, build: Builder) -> None:
    """Deploy on Ray and serve until SIGINT/SIGTERM."""
    assert settings.ray is not None
    local = settings.ray == "local"
    if local:
        # The node's address is loopback unless the user serves beyond it.
        node_ip = "127.0.0.1" if settings.host in ("127.0.0.1", "localhost") else None
        ray.init(_node_ip_address=node_ip, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=settings.ray, log_to_driver=False)
    stop = threading.Event()
    handlers = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deploy(settings, build)
        log.info(
            "serving %s on Ray (%s): http %s:%s, %s",
            settings.repository, settings.ray, settings.host, settings.http_port,
            f"autoscale {settings.autoscale}" if settings.autoscale
            else f"{settings.replicas} replicas",
        )  # fmt: skip
        stop.wait()
    finally:
        log.info("shutting down: deleting the Ray Serve application")
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
            ray.shutdown()
