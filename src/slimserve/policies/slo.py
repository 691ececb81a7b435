"""Per-request latency objectives: which unit of a model answers a request that carries one.

A request may say `latency_slo_ms` (answer within this many milliseconds, counted from when
the server took it) and `max_quality_loss` (points of quality it accepts to give up against
the original). Each unit of the version (the original and its variants) is an `Option`: its
quality loss from its profile, its batch latency curve from its profile, and the live state of
its queue. The choice, in the manner of INFaaS but per request:

1. keep the options within the quality budget that are healthy (the original always is within);
2. predict each one's latency (`predict_ms`): what runs before its batch can start (the rest
   of the unit's running batch, the full batches queued ahead of it, and the batches of other
   units sharing its inference thread: serving/threads.py runs a unit's batches on one thread
   that several units may share, so a small variant waits behind a large original's batch),
   the batching delay while a partial batch fills toward the batcher's target, the profile's
   latency at the batch the request joins, scaled by how much slower than its profile the unit
   runs now (CPU contention from other processes), the fixed time a request spends outside
   the model (transport; from the profile's one-client sweep point) and, where the profile
   measured the serving path (open-loop points), its tail: the lone request's spread
   (one-client p99 - p50) and the fitted serving path's p99 at the server's current request
   rate (policies/queueing.py, as the plan predicts it). With the tail the prediction is a
   99th percentile, what the request is expected to stay within, so a unit is chosen only
   when it is likely to meet the objective, not when its median only just does;
3. among the loaded options whose prediction fits the time left, answer with the one that gives
   up the least quality (the original first), the faster one on a tie: a request is degraded
   only as far as its deadline needs, never further;
4. only when no loaded option fits, an unloaded one whose prediction plus its last measured
   load time fits (a request prefers what is resident);
5. none fits: the answer says the objective was not reachable, and it comes from the loaded
   option within the quality budget predicted to answer first (the client said it would
   give up that much quality for speed, and the original would be the latest of all: under
   overload, sending the misses to the original made them later still and slowed the
   variants sharing its thread); the original when no loaded option has a prediction.

Pure: the caller passes `now` and when the request arrived (seconds, monotonic).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Option:
    """One unit that could answer: its profile and the state of its queue now."""

    variant: str | None  # None: the original
    quality_loss: float  # points given up against the original (0 for the original)
    latency_ms_by_batch: tuple[tuple[int, float], ...]  # profile: (batch rows, ms), sorted
    loaded: bool = True
    healthy: bool = True  # breaker closed, not failed
    running_left_ms: float = 0.0  # what is left of the unit's batch on the runtime now
    thread_busy_ms: float = 0.0  # other units' batches ahead on the same inference thread
    queued_rows: int = 0  # rows waiting now, which a new request would batch with
    max_batch_size: int = 1  # 0 or 1: no batching
    batch_delay_ms: float = 0.0  # how long a partial batch may wait to fill
    fill_rows: int = 1  # rows the batcher waits for before it sends a partial batch
    slowdown: float = 1.0  # live batch time / the profile's at the same rows (> 1: a busy box)
    overhead_ms: float = 0.0  # per request outside the model (transport), from the profile
    tail_ms: float = 0.0  # the serving path's tail (p99) at the current rate, from the profile
    load_ms: float | None = None  # last measured load time (unloaded options only)


@dataclass(frozen=True, slots=True)
class Choice:
    """The unit to answer with, what it is predicted to take, and whether that fits."""

    variant: str | None
    predicted_ms: float | None  # None: the original answered without a usable profile
    met: bool


def batch_latency_ms(curve: tuple[tuple[int, float], ...], rows: float) -> float | None:
    """The profile's latency for a batch of `rows`: linear between measured sizes, scaled by
    rows/size past the largest (per-row cost then stays constant), None without a profile."""
    if not curve:
        return None
    sizes = [size for size, _ in curve]
    i = bisect.bisect_left(sizes, rows)
    if i < len(curve) and sizes[i] == rows:
        return curve[i][1]
    if i == 0:
        return curve[0][1]  # below the smallest measured batch: no cheaper than it
    if i == len(curve):
        size, ms = curve[-1]
        return ms * rows / size
    (s0, m0), (s1, m1) = curve[i - 1], curve[i]
    return m0 + (m1 - m0) * (rows - s0) / (s1 - s0)


def predict_ms(option: Option, rows: int) -> float | None:
    """Milliseconds until a request of `rows` arriving now is answered by `option`: the work
    ahead of its batch, the batching delay, its batch's compute, the transport overhead and
    the serving path's tail."""
    size = max(1, option.max_batch_size)
    full, joined = divmod(option.queued_rows, size)  # full batches leave before it
    batch = min(joined + rows, size) if option.max_batch_size > 1 else rows
    compute = batch_latency_ms(option.latency_ms_by_batch, batch)
    if compute is None:
        return None
    ahead = 0.0
    if full:
        ahead = full * (batch_latency_ms(option.latency_ms_by_batch, size) or compute)
    # A partial batch waits (at most the delay bound) while the batcher expects more rows.
    delay = option.batch_delay_ms if batch < min(option.fill_rows, size) else 0.0
    work = (ahead + compute) * option.slowdown
    outside = option.overhead_ms + option.tail_ms
    total = option.running_left_ms + option.thread_busy_ms + delay + work + outside
    if not option.loaded:
        if option.load_ms is None:
            return None  # never loaded here: its load time is unknown
        total += option.load_ms
    return total


def choose(
    options: list[Option],
    latency_slo_ms: float,
    max_quality_loss: float,
    rows: int,
    arrived: float,
    now: float,
) -> Choice:
    """The option to answer with (see the module doc); `options` must hold the original."""
    left_ms = latency_slo_ms - max(0.0, now - arrived) * 1000.0
    usable = [o for o in options if o.healthy and o.quality_loss <= max_quality_loss]
    for loaded in (True, False):
        fits = []
        for option in usable:
            if option.loaded != loaded:
                continue
            predicted = predict_ms(option, rows)
            if predicted is not None and predicted <= left_ms:
                fits.append((option.quality_loss, predicted, option.variant or "", option))
        if fits:
            _, predicted, _, best = min(fits, key=lambda f: f[:3])
            return Choice(best.variant, predicted, True)
    return _fastest(usable, options, rows)


def _fastest(usable: list[Option], options: list[Option], rows: int) -> Choice:
    """No option fits: the loaded usable one predicted first (least loss on a tie), else the
    original; met is False either way."""
    ranked = [
        (predicted, option.quality_loss, option.variant or "", option)
        for option in usable
        if option.loaded and (predicted := predict_ms(option, rows)) is not None
    ]
    if ranked:
        predicted, _, _, best = min(ranked, key=lambda r: r[:3])
        return Choice(best.variant, predicted, False)
    original = next((o for o in options if o.variant is None), None)
    predicted = predict_ms(original, rows) if original is not None else None
    return Choice(None, predicted, False)
