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
