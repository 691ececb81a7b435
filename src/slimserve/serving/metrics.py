"""Prometheus metrics for one engine, in a registry of its own.

Per-request figures (outcomes, latency) are counted as requests finish; everything the engine
already tracks (queue depths, resident bytes, loads, breaker states, cache counters, shed and
limited counts) is read when /metrics is scraped, so it costs nothing per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from slimserve.policies.breaker import BreakerState
from slimserve.serving.models import State

if TYPE_CHECKING:
    from slimserve.serving.engine import Engine

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "slimserve_requests",
            "Inference requests by model, variant and outcome.",
            ["model", "variant", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "slimserve_request_duration_seconds",
            "Engine time per request (queue + model).",
            ["model", "variant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "slimserve_queue_duration_seconds",
            "Time requests waited for their batch.",
            ["model", "variant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "slimserve_batch_size_rows",
            "Rows per batch the model ran.",
            ["model", "variant"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        r.register(_EngineState(engine))
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def observe_request(self, model: str, variant: str, outcome: str, seconds: float) -> None:
        # labels() hashes and locks on every call; the children are cached per label set.
        key = (model, variant, outcome)
        children = self._children.get(key)
        if children is None:
            latency = self.latency.labels(model, variant) if outcome == "success" else None
            children = self._children[key] = (self.requests.labels(*key), latency)
        children[0].inc()
        if children[1] is not None:
            children[1].observe(seconds)

    def observe_batch(self, model: str, variant: str, rows: int, queue_s: list[float]) -> None:
        self.batch_size.labels(model, variant).observe(rows)
        child = self.queue_time.labels(model, variant)
        for seconds in queue_s:
            child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineState:
    """Reads the engine's own counters at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        m = e.models
        yield _gauge("slimserve_memory_budget_bytes", "Memory budget for models.", m.budget_bytes)
        yield _gauge("slimserve_resident_bytes", "Memory held by resident models.", m.used_bytes)
        units = [u for entry in m.models.values() for u in entry.units.values()]
        yield _gauge(
            "slimserve_resident_models",
            "Resident (loaded) units.",
            sum(u.state is State.READY for u in units),
        )
        yield _counter("slimserve_model_loads", "Model loads.", m.loads)
        yield _counter("slimserve_model_evictions", "Evictions to make room.", m.evictions)
        for what in ("limited", "shed", "broken", "degraded"):
            yield _counter(
                f"slimserve_requests_{what}",
                f"Requests {what} by admission control.",
                e.admission.counts[what],
            )
        depth = GaugeMetricFamily(
            "slimserve_queue_depth", "Requests waiting per unit.", labels=["model", "variant"]
        )
        breaker = GaugeMetricFamily(
            "slimserve_breaker_state", "0 closed, 1 half-open, 2 open.", labels=["model", "variant"]
        )
        cold = GaugeMetricFamily(
            "slimserve_cold_load_seconds", "Last load time per unit.", labels=["model", "variant"]
        )
        for u in units:
            labels = [u.target.model, u.target.variant or ""]
            depth.add_metric(labels, u.batcher.queue_depth if u.batcher else 0)
            breaker.add_metric(labels, _BREAKER_VALUE[e.admission.breaker_state(u)])
            if u.cold_load_s is not None:
                cold.add_metric(labels, u.cold_load_s)
        yield from (depth, breaker, cold)
        hits = CounterMetricFamily("slimserve_cache_hits", "Response cache hits.", labels=["model"])
        misses = CounterMetricFamily(
            "slimserve_cache_misses", "Response cache misses.", labels=["model"]
        )
        for model, cache in e.caches.items():
            hits.add_metric([model], cache.hits)
            misses.add_metric([model], cache.misses)
        yield from (hits, misses)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
