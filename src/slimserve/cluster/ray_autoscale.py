"""Ray Serve's custom autoscaling policy hook, deciding with policies.autoscale from the
signals each replica publishes (`record_autoscaling_stats`: requests in flight, the age of
its oldest request). Ray calls `scale(ctx)` on its controller every control-loop tick.
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext

from slimserve.policies.autoscale import AutoscaleConfig, AutoscaleState, Signals, decide


def scale(ctx: AutoscalingContext, max_queue_delay_s: float = 0.5) -> tuple[int, dict[str, Any]]:
    """(replicas to run, the state to hand back next tick)."""
    bounds = ctx.config  # the deployment's AutoscalingConfig
    assert bounds is not None, "Ray calls a policy only for an autoscaling deployment"
    config = AutoscaleConfig(
        min_replicas=ctx.capacity_adjusted_min_replicas,
        max_replicas=ctx.capacity_adjusted_max_replicas,
        target_in_flight=bounds.target_ongoing_requests,
        max_queue_delay_s=max_queue_delay_s,
        upscale_delay_s=bounds.upscale_delay_s,
        downscale_delay_s=bounds.downscale_delay_s,
    )
    metrics = ctx.aggregated_metrics or {}
    in_flight = metrics.get("in_flight", {})
    signals = Signals(
        replicas=ctx.current_num_replicas,
        # Ray's own count of requests queued in the routers plus those on replicas sees load
        # before a replica has reported it.
        in_flight=max(sum(in_flight.values()), ctx.total_num_requests),
        queue_delay_s=max(metrics.get("oldest_s", {}).values(), default=0.0),
    )
    state = AutoscaleState(ctx.policy_state.get("wanted"), ctx.policy_state.get("since", 0.0))
    target = decide(config, state, ctx.current_time or 0.0, signals)
    return target, {"wanted": state.wanted, "since": state.since}
