"""How many replicas a deployment should run, from slimserve's own signals.

Signals: requests in flight across the replicas (queued or running) and the longest queue
delay any replica reports (how long its oldest waiting request has waited). The wanted count
is in-flight over the per-replica target, rounded up; a queue delay over `max_queue_delay_s`
asks for one more replica than now even when in-flight looks fine (slow requests). Bounded
by min and max. A change must be wanted without a break for `upscale_delay_s` (up) or
`downscale_delay_s` (down) before it is made, so a burst does not start a replica and a lull
does not stop one. Pure: the caller passes the clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    target_in_flight: float = 8.0  # requests per replica at which it counts as busy
    max_queue_delay_s: float = 0.5
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.target_in_flight <= 0:
            raise ValueError("target_in_flight must be > 0")


@dataclass(frozen=True, slots=True)
class Signals:
    replicas: int  # running now
    in_flight: float  # requests queued or running, summed over replicas
    queue_delay_s: float = 0.0  # the longest wait of a queued request on any replica


@dataclass
class AutoscaleState:
    """Since when the current wish (up or down) has held; None: no change wanted."""

    wanted: int | None = None
    since: float = 0.0


def wanted_replicas(config: AutoscaleConfig, signals: Signals) -> int:
    """The count the signals ask for now, before the delays."""
    want = math.ceil(signals.in_flight / config.target_in_flight)
    if signals.queue_delay_s > config.max_queue_delay_s:
        want = max(want, signals.replicas + 1)
    return max(config.min_replicas, min(config.max_replicas, want))


def decide(config: AutoscaleConfig, state: AutoscaleState, now: float, signals: Signals) -> int:
    """The replica count to run from `now` on."""
    bounded = max(config.min_replicas, min(config.max_replicas, signals.replicas))
    if bounded != signals.replicas:
        state.wanted = None
        return bounded  # outside min..max (the bounds changed): no delay
    want = wanted_replicas(config, signals)
    if want == signals.replicas:
        state.wanted = None
        return signals.replicas
    up = want > signals.replicas
    if state.wanted is None or (state.wanted > signals.replicas) != up:
        state.wanted, state.since = want, now  # a new wish (or the direction turned)
    state.wanted = max(state.wanted, want) if up else min(state.wanted, want)
    delay = config.upscale_delay_s if up else config.downscale_delay_s
    if now - state.since >= delay:
        state.wanted = None
        return want
    return signals.replicas
