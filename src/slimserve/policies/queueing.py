"""Latency of a unit under open-loop (Poisson) arrivals, from its measured profile.

`slimserve profile` measures a closed loop: N clients, each waiting for its answer before it
sends again, so the server never sees more than N requests and never a burst. Traffic at a
rate of lambda requests/s from many users is an open loop: arrivals do not wait for answers,
and Poisson bursts queue up. A sweep point's p99 at the throughput equal to lambda is
therefore not the p99 at rate lambda (the previous plan read it off that way and was 5x off
under bursts). Here the server is modelled as one queue whose "customer" is a batch:

- a lone request takes the one-client sweep point's latency (p50 and p99, end to end: client,
  transport, model at batch 1);
- the bottleneck is busy `T(b) = S(b) + h * b` ms for a batch of b rows: S(b) the runtime's
  batch latency (the profile's in-process `latency_ms_by_batch`), h a serial per-request cost
  outside the model (the event loop, encoding, the load generator on the same cores),
  calibrated so that the busiest sweep point's throughput is what the model says it sustains;
- at rate lambda the dynamic batcher forms batches of the rows that arrive while one batch
  runs: b = lambda * T(b), at least 1, at most max_batch_size (a fixed point: "the batch size
  the rate implies"); utilization rho = lambda * T(b) / b;
- the wait before a request's batch starts: with batching, the batcher takes everything queued
  into its next batch, so a request waits at most the rest of the running batch (busy with
  probability rho, at a uniform point of it): p99 = T(b) * (1 - 0.01 / rho). Without
  batching, one request at a time: an M/G/1 queue, mean wait by Kingman's approximation with
  Poisson arrivals (ca^2 = 1; exact for M/G/1, Pollaczek-Khinchine), E[W] = rho / (1 - rho) *
  (1 + cs^2) / 2 * T(1), cs^2 from the lone request's spread (p99 - p50 = 2.33 sigma), and an
  exponential tail P(W > t) ~ rho * exp(-t rho / E[W]): p99 = E[W] / rho * ln(100 rho);
- a request's p99: the lone request's median, plus its larger batch's extra time, plus the
  wait's p99 and the lone request's spread combined as independent spreads (root of the sum
  of squares: within a few percent of the exact p99 of a sum of two exponentials);
- plus the serving path (`ServingPath`), where the profile measured it: the server's own
  serial work per request outside the model (event loop: HTTP parsing, admission, the
  batcher's hand-off, the response) is a second queue in front of the model, an M/D/1 queue
  with per-request cost c (mean wait rho c / (2 (1 - rho)), rho = lambda c, the same
  exponential tail), and an open loop costs a fixed extra e over the closed loop's lone request
  (the server idles between arrivals and wakes up for each). Neither shows in the closed-loop
  sweep at the rates that matter: at 1,200 req/s of a 0.13 ms model the prediction without it
  was 1.0 ms against 4.5 ms measured. So `slimserve profile` also drives the real server with
  open-loop (Poisson) traffic at a few rates, and c and e are fitted to the p99 left over
  after the model above (least squares; c also caps the throughput at 1000 / c).

Pure; units: milliseconds and requests per second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from slimserve.policies.slo import batch_latency_ms

Curve = tuple[tuple[int, float], ...]
_Z99 = 2.326  # standard normal 99th percentile: p99 - p50 = 2.326 sigma for a normal spread
# The serving path's per-request cost is searched on a grid of this many steps, then again
# on as many steps within one step of the best (resolution: the range / steps^2; a few ms in
# all, paid once per profile by the server).
_FIT_STEPS = 200


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One closed-loop point of `slimserve profile` (at the batching the server will use)."""

    concurrency: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class OpenLoopPoint:
    """One open-loop point of `slimserve profile`: p99 at a Poisson arrival rate."""

    rate_rps: float
    p99_ms: float
    weight: float = 1.0  # its share in the fit (the requests it measured: a p99 of more is surer)


@dataclass(frozen=True, slots=True)
class ServingPath:
    """The server's own per-request work outside the model, fitted on open-loop points."""

    extra_ms: float  # e: an open-loop request's fixed extra over the closed loop's lone one
    per_request_ms: float  # c: serial cost per request (the event loop)

    def wait_p99_ms(self, rate_rps: float) -> float:
        """p99 of the wait for the serial stage (M/D/1, exponential tail); inf at rho >= 1."""
        rho = rate_rps / 1000.0 * self.per_request_ms
        if rho >= 1.0:
            return math.inf
        if rho <= 0.01:
            return 0.0
        mean_wait = rho / (1.0 - rho) / 2.0 * self.per_request_ms  # Kingman, cs^2 = 0
        return mean_wait / rho * math.log(100.0 * rho)

    def p99_ms(self, rate_rps: float) -> float:
        return self.extra_ms + self.wait_p99_ms(rate_rps)


@dataclass(frozen=True, slots=True)
class ServiceModel:
    """One unit, one batching configuration, calibrated on its profile."""

    batch_ms: Curve  # S(b): the runtime's latency per batch size (in-process medians)
    max_batch_size: int  # 0 or 1: no batching
    lone_p50_ms: float  # a lone request, end to end (the sweep's one-client point)
    lone_p99_ms: float
    per_request_ms: float  # h: serial cost per request outside the model (calibrated)
    serving: ServingPath | None = None  # the serving path (None: not measured)

    def busy_ms(self, rows: float) -> float:
        """T(b): how long the bottleneck is busy with a batch of `rows`."""
        compute = batch_latency_ms(self.batch_ms, rows) or 0.0
        return compute + self.per_request_ms * rows

    @property
    def largest_batch(self) -> int:
        return max(1, self.max_batch_size)

    @property
    def saturation_rps(self) -> float:
        """The most requests/s the unit sustains (full batches back to back)."""
        size = self.largest_batch
        model = size * 1000.0 / self.busy_ms(size)
        path = self.serving.per_request_ms if self.serving is not None else 0.0
        return min(model, 1000.0 / path) if path > 0 else model

    @property
    def scv(self) -> float:
        """cs^2 of the service time, from the lone request's spread, within [0, 1]."""
        sigma = max(0.0, self.lone_p99_ms - self.lone_p50_ms) / _Z99
        return min(1.0, (sigma / self.lone_p50_ms) ** 2) if self.lone_p50_ms > 0 else 1.0


def calibrate(points: list[SweepPoint], batch_ms: Curve, max_batch_size: int) -> ServiceModel:
    """The service model of a unit from its sweep (one batching configuration) and its batch
    latency curve: the lone request from the lowest-concurrency point, h from the busiest."""
    if not points or not batch_ms:
        raise ValueError("a sweep and a batch latency curve are needed")
    lone = min(points, key=lambda p: (p.concurrency, p.p50_ms))
    busiest = max(points, key=lambda p: p.throughput_rps)
    rows = min(busiest.concurrency, max(1, max_batch_size))
    per_row = (batch_latency_ms(batch_ms, rows) or 0.0) / rows
    h = max(0.0, 1000.0 / busiest.throughput_rps - per_row)
    return ServiceModel(batch_ms, max_batch_size, lone.p50_ms, lone.p99_ms, h)


def batch_rows(model: ServiceModel, rate_rps: float) -> float:
    """The batch the rate implies (mean rows): those that arrive while one such batch runs,
    b = rate * T(b), at least 1 and at most max_batch_size."""
    per_ms, largest = rate_rps / 1000.0, float(model.largest_batch)
    if per_ms * model.busy_ms(1.0) <= 1.0:
        return 1.0
    if per_ms * model.busy_ms(largest) >= largest:
        return largest  # even the largest batch cannot keep up
    lo, hi = 1.0, largest  # rate * T(b) - b: > 0 at lo, < 0 at hi
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if per_ms * model.busy_ms(mid) > mid else (lo, mid)
    return (lo + hi) / 2.0


def utilization(model: ServiceModel, rate_rps: float) -> float:
    """Share of time the bottleneck is busy at `rate_rps` (>= 1: it cannot keep up)."""
    rows = batch_rows(model, rate_rps)
    return rate_rps / 1000.0 * model.busy_ms(rows) / rows


def wait_p99_ms(model: ServiceModel, rate_rps: float, rows: float) -> float:
    """p99 of the time a request waits before its batch starts (ms)."""
    busy = model.busy_ms(rows)
    rho = min(1.0, rate_rps / 1000.0 * busy / rows)
    if rho <= 0.01:  # the server is idle on arrival for 99% of requests
        return 0.0
    if model.largest_batch > 1:
        # A dynamic batcher takes everything queued into its next batch, so a request waits
        # at most the rest of the running batch: found busy with probability rho, at a
        # uniform point of it.
        return busy * (1.0 - 0.01 / rho)
    mean_wait = rho / (1.0 - rho) * (1.0 + model.scv) / 2.0 * busy  # Kingman, ca^2 = 1
    return mean_wait / rho * math.log(100.0 * rho)


def p99_ms(model: ServiceModel, rate_rps: float) -> float:
    """Expected p99 (ms) at `rate_rps` Poisson arrivals; inf where the unit cannot keep up."""
    rows = batch_rows(model, rate_rps)
    rho = utilization(model, rate_rps)
    # Batching keeps up (rho = 1, batches grow) until the largest batch cannot.
    if rho >= 1.0 if model.largest_batch == 1 else rho > 1.0 + 1e-6:
        return math.inf
    longer = model.busy_ms(rows) - model.busy_ms(1)  # its own batch is larger than a lone one
    spread = max(0.0, model.lone_p99_ms - model.lone_p50_ms)
    p99 = model.lone_p50_ms + longer + math.hypot(spread, wait_p99_ms(model, rate_rps, rows))
    if model.serving is not None:  # a fitted extra may be < 0; never under a lone median
        p99 = max(model.lone_p50_ms, p99 + model.serving.p99_ms(rate_rps))
    return p99


def fit_serving_path(model: ServiceModel, points: list[OpenLoopPoint]) -> ServingPath | None:
    """c and e (see the module doc) by weighted least squares on what the open-loop points'
    p99 leaves after `model` (without a serving path), within what is physical: for each c on
    a fine grid from 0 to the cost that would saturate at the highest measured rate, e is the
    weighted mean residual, but never below 0 (an open-loop request costs no less than a
    closed-loop one: a negative e only fits the noise of few points, and would predict under
    the lone request's own p99 at low rates). One point pins one term: c = 0 and e from it.
    None without a usable point (one the model says it keeps up with)."""
    bare = replace(model, serving=None)
    used = [
        (p.rate_rps, p.p99_ms - base, max(p.weight, 1e-9))
        for p in points
        if p.rate_rps > 0 and math.isfinite(base := p99_ms(bare, p.rate_rps))
    ]
    if not used:
        return None
    most = 1000.0 / max(rate for rate, _, _ in used) * 0.999
    if len(used) == 1:
        return _fit_at(used, 0.0)[1]
    step = most / _FIT_STEPS
    best = min((_fit_at(used, step * i) for i in range(_FIT_STEPS)), key=lambda f: f[0])
    low = max(0.0, best[1].per_request_ms - step)
    fine = (_fit_at(used, min(most, low + 2 * step * i / _FIT_STEPS)) for i in range(_FIT_STEPS))
    return min([best, *fine], key=lambda f: f[0])[1]


def _fit_at(used: list[tuple[float, float, float]], c: float) -> tuple[float, ServingPath]:
    """The squared error and the path with per-request cost `c`, e its best value >= 0, on
    (rate, residual p99, weight) points."""
    left = [(r - ServingPath(0.0, c).wait_p99_ms(rate), w) for rate, r, w in used]
    extra = max(0.0, sum(x * w for x, w in left) / sum(w for _, w in left))
    return sum(w * (x - extra) ** 2 for x, w in left), ServingPath(extra, c)


def same_batching(rows: Any, max_batch_size: int, delay_ms: float) -> list[dict[str, Any]]:
    """Profile rows (sweep or open-loop points) measured without errors with this batching
    (what the server will do); all usable rows when none were."""
    usable = [
        r
        for r in (rows if isinstance(rows, list) else [])
        if isinstance(r, dict)
        and not r.get("errors")
        and r.get("throughput_rps")
        and r.get("p99_ms") is not None
    ]
    same = [
        r
        for r in usable
        if r.get("max_batch_size") == max_batch_size and r.get("max_queue_delay_ms") == delay_ms
    ]
    return same or usable


def from_profile(
    extra: Mapping[str, Any], batch_ms: Curve, max_batch_size: int, delay_ms: float
) -> ServiceModel | None:
    """A unit's model from what `slimserve profile` wrote (`extra`: the profile's `sweep` and
    `open_loop` rows) and its batch latency curve, with the serving path fitted on the
    open-loop points (each weighted by the requests it answered, the number behind its p99;
    by its throughput where the profile predates that count); None without the curve or a
    sweep point with a concurrency and a p50."""
    rows = same_batching(extra.get("sweep"), max_batch_size, delay_ms)
    points = [
        SweepPoint(
            int(r["concurrency"]),
            float(r["throughput_rps"]),
            float(r["p50_ms"]),
            float(r["p99_ms"]),
        )
        for r in rows
        if r.get("concurrency") and r.get("p50_ms") is not None
    ]
    if not points or not batch_ms:
        return None
    model = calibrate(points, batch_ms, max_batch_size)
    opened = [
        OpenLoopPoint(
            float(r["rate_rps"]),
            float(r["p99_ms"]),
            float(r.get("requests") or r["throughput_rps"]),
        )
        for r in same_batching(extra.get("open_loop"), max_batch_size, delay_ms)
        if isinstance(r.get("rate_rps"), int | float)
    ]
    return replace(model, serving=fit_serving_path(model, opened))


def capacity_rps(model: ServiceModel, objective_ms: float) -> float:
    """The highest rate whose expected p99 meets `objective_ms` (0: not even a lone request)."""
    if p99_ms(model, 0.0) > objective_ms:
        return 0.0
    lo, hi = 0.0, model.saturation_rps
    for _ in range(60):  # bisection; p99 rises with the rate
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if p99_ms(model, mid) <= objective_ms else (lo, mid)
    return lo
