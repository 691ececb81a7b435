"""Prometheus metrics for one engine, in a registry of its own.

Per-request figures (outcomes, latency) are counted as requests finish; everything the engine
already tracks (queue depths, resident bytes, loads, breaker states, cache counters, shed and
limited counts) is read when /metrics is scraped, so it costs nothing per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from slimserve.policies.breaker import BreakerState
from slimserve.repository.store import Target
from slimserve.runtimes.base import TextGenerator
from slimserve.serving.admission import Admission
from slimserve.serving.cache import ResponseCaches
from slimserve.serving.models import ModelManager, State, Unit

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Generation: time to first token spans queueing and prefill (seconds, up to long prompts on a
# busy CPU); inter-token latency is one decode iteration (milliseconds to a second).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FINISH_REASONS = ("stop", "length", "abort")  # abort: cancelled, past its deadline, or failed
_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class Metrics:
    """The engine's Prometheus registry; `watch` adds the state read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "slimserve_requests",
            "Inference requests by model, variant and outcome.",
            ["model", "variant", "outcome"],
            registry=r,
        )
        self.latency = _per_unit(
            r, "slimserve_request_duration_seconds", "Engine time per request (queue + model)."
        )
        self.queue_time = _per_unit(
            r, "slimserve_queue_duration_seconds", "Time requests waited for their batch."
        )
        self.batch_size = _per_unit(
            r, "slimserve_batch_size_rows", "Rows per batch the model ran.", _BATCH_BUCKETS
        )
        self.degraded = Counter(
            "slimserve_degraded_requests",
            "Requests a variant answered because its original was under pressure or failing.",
            ["model", "variant"],
            registry=r,
        )
        self.generation = GenerationMetrics(r)
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

    def observe_degraded(self, model: str, variant: str) -> None:
        self.degraded.labels(model, variant).inc()

    def watch(self, models: ModelManager, admission: Admission, caches: ResponseCaches) -> None:
        """Report these parts' own counters (residency, admission, caches) at each scrape."""
        self.registry.register(_EngineState(models, admission, caches))

    def batch_observer(self, target: Target) -> Callable[[int, list[float]], None]:
        """What a unit's batcher calls after each batch: its rows and each row's queue time."""
        model, variant = target.model, target.variant or ""

        def observe(rows: int, queue_s: list[float]) -> None:
            self.observe_batch(model, variant, rows, queue_s)

        return observe

    def observe_batch(self, model: str, variant: str, rows: int, queue_s: list[float]) -> None:
        self.batch_size.labels(model, variant).observe(rows)
        child = self.queue_time.labels(model, variant)
        for seconds in queue_s:
            child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _per_unit(
    r: CollectorRegistry, name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS
) -> Histogram:
    """A histogram labelled by model and variant."""
    return Histogram(name, doc, ["model", "variant"], buckets=buckets, registry=r)


class GenerationMetrics:
    """Token-level figures of language models, per model and variant (label children cached:
    a stream records each token with no label lookup)."""

    def __init__(self, r: CollectorRegistry) -> None:
        labels = ["model", "variant"]
        self.prompt_tokens = Counter(
            "slimserve_generation_prompt_tokens", "Prompt tokens submitted.", labels, registry=r
        )
        self.generated_tokens = Counter(
            "slimserve_generation_tokens", "Tokens generated.", labels, registry=r
        )
        self.ttft = Histogram(
            "slimserve_generation_time_to_first_token_seconds",
            "Submission to the first generated token (queue + prefill).",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "slimserve_generation_inter_token_seconds",
            "Time between two tokens of one choice (one decode iteration).",
            labels,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "slimserve_generation_request_duration_seconds",
            "Submission to the last token (or the abort) of a generation request.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "slimserve_generation_finished",
            "Choices finished, by reason: stop, length or abort.",
            [*labels, "reason"],
            registry=r,
        )
        self._children: dict[tuple[str, str], tuple[Any, ...]] = {}

    def meter(self, model: str, variant: str, prompt_tokens: int, n: int) -> TokenMeter:
        """A meter for one request (its prompt is counted now)."""
        key = (model, variant)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.prompt_tokens.labels(*key),
                self.generated_tokens.labels(*key),
                self.ttft.labels(*key),
                self.itl.labels(*key),
                self.e2e.labels(*key),
                {r: self.finished.labels(*key, r) for r in FINISH_REASONS},
            )
        children[0].inc(prompt_tokens)
        return TokenMeter(children, n)


class TokenMeter:
    """Records one request's tokens as its events arrive; `close` once at its end."""

    __slots__ = ("_children", "_closed", "_finished", "_first", "_last", "_started")

    def __init__(self, children: tuple[Any, ...], n: int) -> None:
        self._children = children
        self._started = time.perf_counter()
        self._last: list[float | None] = [None] * n  # per choice: when its last token came
        self._first = True
        self._finished = 0
        self._closed = False

    def tokens(self, index: int, count: int, finish_reason: str | None) -> None:
        """`count` new tokens of choice `index` (a TokenEvent), arrived now."""
        if count:
            now = time.perf_counter()
            if self._first:
                self._first = False
                self._children[2].observe(now - self._started)
            last = self._last[index]
            if last is not None:
                self._children[3].observe((now - last) / count)
            self._last[index] = now
            self._children[1].inc(count)
        if finish_reason is not None:
            self._finished += 1
            self._children[5].get(finish_reason, self._children[5]["abort"]).inc()

    def close(self) -> None:
        """The request ended (normally or not): its duration, and unfinished choices as
        aborted."""
        if self._closed:
            return
        self._closed = True
        self._children[4].observe(time.perf_counter() - self._started)
        unfinished = len(self._last) - self._finished
        if unfinished > 0:
            self._children[5]["abort"].inc(unfinished)


class _EngineState:
    """Reads the engine's own counters at scrape time."""

    def __init__(self, models: ModelManager, admission: Admission, caches: ResponseCaches) -> None:
        self.models, self.admission, self.caches = models, admission, caches

    def collect(self) -> Iterator[Metric]:
        m, admission = self.models, self.admission
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
                admission.counts[what],
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
            breaker.add_metric(labels, _BREAKER_VALUE[admission.breaker_state(u)])
            if u.cold_load_s is not None:
                cold.add_metric(labels, u.cold_load_s)
        yield from (depth, breaker, cold)
        hits = CounterMetricFamily("slimserve_cache_hits", "Response cache hits.", labels=["model"])
        misses = CounterMetricFamily(
            "slimserve_cache_misses", "Response cache misses.", labels=["model"]
        )
        for model, cache in self.caches.items():
            hits.add_metric([model], cache.hits)
            misses.add_metric([model], cache.misses)
        yield from (hits, misses)
        yield from _generation_state(units)


def _generation_state(units: list[Unit]) -> Iterator[Metric]:
    """The generation engines' own state (sequences, KV blocks, prefix hits), read at scrape."""
    labels = ["model", "variant"]
    running = GaugeMetricFamily(
        "slimserve_generation_running_sequences", "Sequences being decoded.", labels=labels
    )
    waiting = GaugeMetricFamily(
        "slimserve_generation_waiting_sequences", "Sequences queued for prefill.", labels=labels
    )
    used = GaugeMetricFamily(
        "slimserve_kv_cache_blocks_used", "KV cache blocks held by sequences.", labels=labels
    )
    total = GaugeMetricFamily(
        "slimserve_kv_cache_capacity_blocks", "KV cache blocks in the pool.", labels=labels
    )
    hits = CounterMetricFamily(
        "slimserve_prefix_cache_hit_tokens",
        "Prompt tokens whose KV came from the prefix cache.",
        labels=labels,
    )
    preempted = CounterMetricFamily(
        "slimserve_generation_preemptions", "Sequences preempted for KV space.", labels=labels
    )
    sums = [0, 0, 0, 0]  # running, waiting, KV blocks used, KV blocks in all pools
    for u in units:
        runtime = u.runtime
        if not isinstance(runtime, TextGenerator) or u.state is not State.READY:
            continue
        s = runtime.generation_stats()
        key = [u.target.model, u.target.variant or ""]
        running.add_metric(key, s.running)
        waiting.add_metric(key, s.waiting)
        used.add_metric(key, s.total_blocks - s.free_blocks)
        total.add_metric(key, s.total_blocks)
        hits.add_metric(key, s.cached_tokens)
        preempted.add_metric(key, s.preemptions)
        for i, value in enumerate((s.running, s.waiting, s.total_blocks - s.free_blocks)):
            sums[i] += value
        sums[3] += s.total_blocks
    yield from (running, waiting, used, total, hits, preempted)
    yield from _inference_gateway_gauges(*sums)


def _inference_gateway_gauges(
    running: int, waiting: int, used: int, total: int
) -> Iterator[Metric]:
    """The three gauges the Kubernetes Gateway API Inference Extension's endpoint picker reads
    from a model server (its model server protocol: queued requests, running requests, KV cache
    utilisation as a fraction), over all the server's language models. Point the picker's
    --total-queued-requests-metric, --total-running-requests-metric and
    --kv-cache-usage-percentage-metric at these names."""
    yield _gauge("slimserve_num_requests_waiting", "LLM requests queued for prefill.", waiting)
    yield _gauge("slimserve_num_requests_running", "LLM requests being decoded.", running)
    yield _gauge(
        "slimserve_kv_cache_usage_perc",
        "Fraction of KV cache blocks in use (0-1), all language models.",
        used / total if total else 0.0,
    )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
