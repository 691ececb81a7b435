"""Degradation: serve a cheaper variant of the same model while the original is under pressure.

`choose` is a pure decision over the variants' measured profiles and the pressure signals.
Hysteresis keeps it from flapping: it degrades as soon as pressure appears and returns to the
original only after `recover_s` seconds without pressure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    """A variant the request may fall back to, from its variant.yaml profile."""

    name: str
    cost: float  # relative serving cost (e.g. batch-1 latency in ms); lower is cheaper
    quality_loss: float  # points lost against the original (1 - agreement, or accuracy drop)
    healthy: bool = True  # its own breaker closed and its queue not full


@dataclass(slots=True)
class DegradeState:
    degraded: bool = False
    calm_since: float | None = None  # when pressure last stopped
    variant: str | None = None


@dataclass(slots=True)
class DemandRate:
    """Rows per second asked of one original, exponentially decayed with `tau_s`.

    While a model is degraded its own queue is empty (the variant takes the traffic), so the
    queue cannot tell whether the pressure is gone; the demand can: demand x seconds per row
    >= 1 means the original would fall behind again if traffic went back to it.
    """

    tau_s: float = 1.0
    value: float = 0.0
    last: float | None = None

    def observe(self, now: float, rows: int = 1) -> None:
        self.value = self.rate(now) + rows / self.tau_s
        self.last = now

    def rate(self, now: float) -> float:
        if self.last is None:
            return 0.0
        return self.value * math.exp(-max(0.0, now - self.last) / self.tau_s)


def pick_cheapest(
    candidates: list[Candidate], original_cost: float, max_quality_loss: float
) -> Candidate | None:
    """The cheapest healthy candidate that is cheaper than the original and within budget."""
    usable = [
        c
        for c in candidates
        if c.healthy and c.quality_loss <= max_quality_loss and c.cost < original_cost
    ]
    return min(usable, key=lambda c: (c.cost, c.quality_loss), default=None)


def choose(
    state: DegradeState,
    now: float,
    pressure: bool,
    candidates: list[Candidate],
    original_cost: float,
    max_quality_loss: float,
    recover_s: float = 5.0,
) -> str | None:
    """The variant to serve now (None: the original). Updates `state`."""
    if pressure:
        state.calm_since = None
        best = pick_cheapest(candidates, original_cost, max_quality_loss)
        state.degraded, state.variant = best is not None, best.name if best else None
        return state.variant
    if not state.degraded:
        return None
    if state.calm_since is None:
        state.calm_since = now
    if now - state.calm_since >= recover_s:
        state.degraded, state.variant, state.calm_since = False, None, None
        return None
    healthy = {c.name for c in candidates if c.healthy}
    if state.variant not in healthy:
        state.degraded, state.variant = False, None
    return state.variant
