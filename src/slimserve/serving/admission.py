"""Admission control: rate limits, concurrency limits, shedding, breakers and degradation.

Every decision is taken by a pure policy (slimserve.policies) from the state kept here and the
time passed in; this module only gathers the inputs (model.yaml limits, queue depth, measured
service time, variant profiles) and turns refusals into errors with Retry-After hints:
429 (RESOURCE_EXHAUSTED) for rate limits, 503 (UNAVAILABLE) for overload and open breakers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from slimserve.config import Settings
from slimserve.errors import ResourceExhausted, Unavailable
from slimserve.policies.breaker import BreakerConfig, BreakerState, CircuitBreaker
from slimserve.policies.degrade import (
    Candidate,
    DegradeState,
    DemandRate,
    choose,
    pick_cheapest,
)
from slimserve.policies.rate_limit import Bucket, KeyedLimiter, Limit, take
from slimserve.policies.shedding import should_shed
from slimserve.repository.schema import GenerationSettings, ModelConfig
from slimserve.runtimes.base import TextGenerator
from slimserve.serving.models import ModelEntry, State, Unit
from slimserve.serving.slo import quality_loss


@dataclass(slots=True)
class UnitGuard:
    """Per served unit: its breaker; for an original version, its degradation state."""

    breaker: CircuitBreaker | None
    degrade: DegradeState = field(default_factory=DegradeState)
    demand: DemandRate = field(default_factory=DemandRate)  # rows/s asked of an original


def _breaker(config: ModelConfig) -> CircuitBreaker | None:
    b = config.breaker
    if not b.enabled:
        return None
    return CircuitBreaker(
        BreakerConfig(
            consecutive_failures=b.consecutive_failures,
            error_rate=b.error_rate,
            slow_call_s=b.slow_call_ms / 1000 if b.slow_call_ms else None,
            slow_rate=b.slow_rate,
            window=b.window,
            min_calls=b.min_calls,
            open_s=b.open_s,
            probe_calls=b.probe_calls,
        )
    )


class Admission:
    def __init__(self, settings: Settings) -> None:
        self._clients: KeyedLimiter | None = None
        if settings.client_rate_limit > 0:
            burst = settings.client_burst or max(1.0, settings.client_rate_limit)
            self._clients = KeyedLimiter(Limit(settings.client_rate_limit, burst))
        self._models: dict[str, Bucket] = {}
        self._guards: dict[str, UnitGuard] = {}
        self.in_flight: defaultdict[str, int] = defaultdict(int)  # per model name
        self.counts: defaultdict[str, int] = defaultdict(int)  # limited, shed, broken, degraded

    def guard(self, unit: Unit) -> UnitGuard:
        key = unit.target.key
        guard = self._guards.get(key)
        if guard is None:
            guard = self._guards[key] = UnitGuard(_breaker(unit.target.config))
        return guard

    def guards(self) -> dict[str, UnitGuard]:
        return self._guards

    def breaker_state(self, unit: Unit) -> BreakerState:
        guard = self._guards.get(unit.target.key)
        if guard is None or guard.breaker is None:
            return BreakerState.CLOSED
        return guard.breaker.state

    # -- 429: rate limits --------------------------------------------------------------------

    def check_rate(self, client: str | None, model: str, config: ModelConfig, now: float) -> None:
        if self._clients is not None and client:
            wait = self._clients.acquire(client, now)
            if wait > 0:
                self._refuse_rate(f"client '{client}' is over its rate limit", wait)
        limits = config.limits
        if limits.rate:
            limit = Limit(limits.rate, limits.burst or max(1.0, limits.rate))
            bucket = self._models.setdefault(model, Bucket(limit.burst, now))
            wait = take(limit, bucket, now)
            if wait > 0:
                self._refuse_rate(f"model '{model}' is over its rate limit", wait)

    def _refuse_rate(self, what: str, wait: float) -> None:
        self.counts["limited"] += 1
        raise ResourceExhausted(f"{what}; retry after {wait:.2f} s", retry_after_s=wait)

    # -- variant choice: breakers and degradation -----------------------------------------

    def route(
        self, entry: ModelEntry, unit: Unit, allow_degrade: bool, now: float, rows: int = 1
    ) -> Unit:
        """The unit that should answer: the one asked for, or a cheaper variant under
        pressure when the request allows it. Raises 503 when its breaker is open."""
        if unit.target.variant is None:
            self.guard(unit).demand.observe(now, rows)
        if allow_degrade and unit.target.variant is None:
            chosen = self._degrade(entry, unit, now)
            if chosen is not None:
                self.counts["degraded"] += 1
                return chosen
        guard = self.guard(unit)
        if guard.breaker is not None and not guard.breaker.allow(now):
            # Half-open with its probes out: the breaker still refuses, so a request that
            # allows it goes to a variant rather than getting a 503.
            fallback = self._fallback(entry, unit) if allow_degrade else None
            if fallback is not None:
                self.counts["degraded"] += 1
                return fallback
            self.counts["broken"] += 1
            retry = guard.breaker.retry_after(now) or 1.0
            raise Unavailable(
                f"{unit.target.key} is failing and its circuit breaker is open; retry after "
                f"{retry:.1f} s, or allow a cheaper variant with the parameter degrade=true",
                retry_after_s=retry,
            )
        return unit

    @staticmethod
    def _variants(entry: ModelEntry, original: Unit) -> dict[str, Unit]:
        return {
            var: u
            for (ver, var), u in entry.units.items()
            if ver == original.target.version and var is not None
        }

    def _fallback(self, entry: ModelEntry, original: Unit) -> Unit | None:
        """The cheapest healthy variant within the quality budget, whatever it costs."""
        if original.target.variant is not None:
            return None
        variants = self._variants(entry, original)
        candidates = [c for c in (self._candidate(u) for u in variants.values()) if c]
        best = pick_cheapest(candidates, math.inf, original.target.config.degrade.max_quality_loss)
        return variants[best.name] if best is not None else None

    def _degrade(self, entry: ModelEntry, original: Unit, now: float) -> Unit | None:
        settings = original.target.config.degrade
        variants = self._variants(entry, original)
        candidates = [c for c in (self._candidate(u) for u in variants.values()) if c]
        # A failing original (breaker not closed) costs "infinitely" much: any variant within
        # the quality budget beats a 503, even one slower than the original when it worked.
        cost = None if self.breaker_state(original) is not BreakerState.CLOSED else math.inf
        cost = cost or _cost(original)
        name = choose(
            self.guard(original).degrade,
            now,
            self._under_pressure(original, now),
            candidates,
            cost if cost is not None else math.inf,
            settings.max_quality_loss,
            settings.recover_s,
        )
        return variants.get(name) if name else None

    def degrade_options(self, entry: ModelEntry, original: Unit) -> list[str]:
        """Keys of the variants degradation may send `original`'s traffic to: profiled,
        within its quality budget and cheaper than it (health aside: that changes by the
        second). For the console's Pareto plot."""
        budget = original.target.config.degrade.max_quality_loss
        cost = _cost(original)
        variants = self._variants(entry, original)
        return sorted(
            unit.target.key
            for unit in variants.values()
            if (c := self._candidate(unit)) is not None
            and c.quality_loss <= budget
            and (cost is None or c.cost < cost)
        )

    def _under_pressure(self, unit: Unit, now: float) -> bool:
        guard = self._guards.get(unit.target.key)
        if guard is not None and guard.breaker is not None and guard.breaker.blocking(now):
            return True
        config = unit.target.config
        if unit.state is State.READY and isinstance(unit.runtime, TextGenerator):
            return _generation_pressure(unit.runtime, config)
        batcher = unit.batcher
        if unit.state is not State.READY or batcher is None:
            return False
        if batcher.queue_depth >= config.degrade.queue_fraction * batcher.max_queue:
            return True
        max_wait = config.limits.max_queue_wait_ms
        if max_wait is not None and batcher.expected_wait_s() * 1000 > max_wait:
            return True
        # Still asked for more than it can serve (its queue is empty while degraded).
        cost = _cost(unit)
        return guard is not None and cost is not None and guard.demand.rate(now) * cost >= 1.0

    def _candidate(self, unit: Unit) -> Candidate | None:
        cost, loss = _cost(unit), quality_loss(unit)
        if cost is None or loss is None:
            return None
        healthy = unit.state is State.READY and self.breaker_state(unit) is BreakerState.CLOSED
        return Candidate(unit.target.variant or "", cost, loss, healthy)

    # -- 503: concurrency and queue time -----------------------------------------------------

    def check_load(self, unit: Unit, time_left_s: float | None) -> None:
        config = unit.target.config
        limit = config.limits.max_concurrency
        model = unit.target.model
        if limit is not None and self.in_flight[model] >= limit:
            self._shed(f"model '{model}' has {limit} requests in flight, its limit", 0.05)
        batcher = unit.batcher
        if batcher is None:
            return
        max_wait = config.limits.max_queue_wait_ms
        shed = should_shed(
            batcher.queued_rows,
            batcher.max_queue * max(1, batcher.max_batch_size),
            batcher.expected_wait_s(),
            max_wait / 1000 if max_wait else None,
            time_left_s,
        )
        if shed is not None:
            self._shed(f"{unit.target.key}: {shed.reason}", shed.retry_after_s)

    def _shed(self, reason: str, retry: float) -> None:
        self.counts["shed"] += 1
        raise Unavailable(f"{reason}; retry shortly", retry_after_s=retry)

    def healthy(self, unit: Unit) -> bool:
        """Whether `unit` may take a request now: its breaker lets calls through."""
        return self.breaker_state(unit) is BreakerState.CLOSED

    def record(self, unit: Unit, now: float, ok: bool, latency_s: float) -> None:
        guard = self._guards.get(unit.target.key)
        if guard is not None and guard.breaker is not None:
            guard.breaker.record(now, ok, latency_s)


def _generation_pressure(generator: TextGenerator, config: ModelConfig) -> bool:
    """A language model batches on its own: it is under pressure when requests wait for a
    place in its running batch (queue_fraction of max_seqs of them)."""
    max_seqs = (config.generation or GenerationSettings()).max_seqs
    waiting = generator.generation_stats().waiting
    return waiting > 0 and waiting >= config.degrade.queue_fraction * max_seqs


def _cost(unit: Unit) -> float | None:
    """Seconds per row: measured while serving, else the profile's batch-1 latency."""
    batcher = unit.batcher
    if batcher is not None and batcher.estimate.samples >= 3:
        return batcher.estimate.batch_s / max(batcher.estimate.batch_rows, 1.0)
    profile = unit.target.profile
    if profile is not None and profile.latency_ms_batch1 is not None:
        return profile.latency_ms_batch1 / 1000
    return None
