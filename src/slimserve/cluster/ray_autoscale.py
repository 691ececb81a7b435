"""Ray Serve's custom autoscaling policy hook: the replica count slimserve's signals ask for
(policies.autoscale.wanted_replicas), from what each replica publishes
(`record_autoscaling_stats`: requests in flight, the age of its oldest request). Ray calls
`scale(ctx)` on its controller every control-loop tick.

The up/down delays are not applied here: Ray wraps every custom policy in its own delay logic
(the deployment's upscale_delay_s / downscale_delay_s, the same rule as
policies.autoscale.decide), and two layers of delay reset each other: the policy must hand
Ray the wanted count on every tick.
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext

from slimserve.policies.autoscale import AutoscaleConfig, Signals, wanted_replicas


def scale(ctx: AutoscalingContext, max_queue_delay_s: float = 0.5) -> tuple[int, dict[str, Any]]:
    """(replicas wanted now, the policy state to keep: none)."""
    bounds = ctx.config  # the deployment's AutoscalingConfig
    assert bounds is not None, "Ray calls a policy only for an autoscaling deployment"
    config = AutoscaleConfig(
        min_replicas=ctx.capacity_adjusted_min_replicas,
        max_replicas=ctx.capacity_adjusted_max_replicas,
        target_in_flight=bounds.target_ongoing_requests,
        max_queue_delay_s=max_queue_delay_s,
    )
    metrics = ctx.aggregated_metrics or {}
    signals = Signals(
        replicas=ctx.current_num_replicas,
        # Ray's own count of requests queued in the routers plus those on replicas sees load
        # before a replica has reported it.
        in_flight=max(sum(metrics.get("in_flight", {}).values()), ctx.total_num_requests),
        queue_delay_s=max(metrics.get("oldest_s", {}).values(), default=0.0),
    )
    return wanted_replicas(config, signals), {}
