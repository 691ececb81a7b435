"""The Ray autoscaling hook, run through Ray's own wrapper of custom policies (which adds the
up/down delays; zero here, so no sleeping): slimserve's signals in, a replica count out."""

from __future__ import annotations

import time
from typing import Any

from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from slimserve.cluster.ray_autoscale import scale

CONFIG = AutoscalingConfig(
    min_replicas=1, max_replicas=3, initial_replicas=1, target_ongoing_requests=4,
    upscale_delay_s=0, downscale_delay_s=0,
)  # fmt: skip


def context(replicas: int, total: float, metrics: dict[str, dict[str, float]]) -> Any:
    return AutoscalingContext(
        deployment_id=None, deployment_name="d", app_name="a", current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=[], total_num_requests=total,
        total_queued_requests=0, aggregated_metrics=metrics, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=3, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(),
        config=CONFIG, total_pending_async_requests=0,
    )  # fmt: skip


def test_in_flight_published_by_replicas_scales_up_and_idle_scales_down():
    policy = _apply_autoscaling_config(scale)
    busy = {"in_flight": {"r1": 6.0, "r2": 5.0}, "oldest_s": {"r1": 0.1, "r2": 0.1}}
    assert policy(context(2, 0, busy))[0] == 3  # 11 in flight over 4 per replica
    assert policy(context(3, 0, {"in_flight": {"r1": 0.0}}))[0] == 1


def test_a_long_queue_delay_adds_one_and_rays_own_count_is_seen_first():
    policy = _apply_autoscaling_config(scale)
    slow = {"in_flight": {"r1": 2.0}, "oldest_s": {"r1": 3.0}}
    assert policy(context(1, 0, slow))[0] == 2
    assert policy(context(1, 9, {}))[0] == 3  # requests queued at the proxy, none reported yet


def test_deployment_options_name_the_router_and_react_within_seconds():
    from slimserve.cluster.ray_serve import deployment_options
    from slimserve.config import Settings

    ours = deployment_options(Settings(ray="local", autoscale="1,2"))
    rays = deployment_options(Settings(ray="local", replicas=2, ray_router="ray"))
    # Ray's proxy keeps a deployment's router across a redeploy of the same name.
    assert ours["name"] != rays["name"]
    assert ours["request_router_config"].request_router_class.endswith("SlimserveRouter")
    # Routing reports wait in the replica for a change: asked again at once, never timed out.
    assert ours["request_router_config"].request_routing_stats_period_s <= 0.1
    assert ours["request_router_config"].request_routing_stats_timeout_s > 1.0
    auto = ours["autoscaling_config"]
    assert (auto.min_replicas, auto.max_replicas) == (1, 2)
    # Push, look-back and delay add up to a few seconds from a load step to the decision.
    assert auto.metrics_interval_s + 0.2 * auto.look_back_period_s + auto.upscale_delay_s <= 2.0
    assert auto.aggregation_function == "max"
