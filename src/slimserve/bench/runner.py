"""The closed load loop: N clients, each with one request in flight, for a fixed time.

All clients run as tasks on one event loop (uvloop when installed) in one thread, so the load
generator takes at most one core from the server it measures. Each client sends the same
pre-encoded request, waits for the answer, and sends again. Latency is taken with
`time.perf_counter_ns` around one request; a request counts when it *completes* inside the
measured window [start + warmup, start + warmup + duration], so throughput is completions per
second and no request is counted twice or cut in half.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# One request: returns "ok" or an error label (an HTTP status like "503", a gRPC code name,
# or "connection").
Send = Callable[[], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Window:
    record_ns: int  # perf_counter_ns at which measuring starts (after warm-up)
    end_ns: int  # ... and ends; clients stop sending here


@dataclass(slots=True)
class Recorder:
    latencies_ns: list[int] = field(default_factory=list)  # successful requests only
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, label: str, latency_ns: int) -> None:
        if label == "ok":
            self.latencies_ns.append(latency_ns)
        else:
            self.errors[label] += 1


@dataclass(frozen=True, slots=True)
class Result:
    protocol: str
    concurrency: int
    duration_s: float
    requests: int  # successful, completed in the window
    errors: dict[str, int]
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    client_cpu_us: float  # load-generator CPU time per completed request (its own cost)

    def to_dict(self) -> dict[str, Any]:
        # NaN (no successful request) becomes null so the JSON stays standard.
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: None if isinstance(v, float) and v != v else v for k, v in out.items()}


async def _client(send: Send, window: Window, rec: Recorder) -> None:
    perf = time.perf_counter_ns
    while True:
        t0 = perf()
        if t0 >= window.end_ns:
            return
        label = await send()
        t1 = perf()
        if window.record_ns <= t1 <= window.end_ns:
            rec.add(label, t1 - t0)


def summarize(
    protocol: str, concurrency: int, duration_s: float, rec: Recorder, cpu_s: float
) -> Result:
    lat = np.asarray(rec.latencies_ns, dtype=np.float64) / 1e6  # ms
    n = int(lat.size)
    if n:
        p50, p90, p99 = np.percentile(lat, [50, 90, 99]).tolist()
        worst, mean = float(lat.max()), float(lat.mean())
    else:
        p50 = p90 = p99 = worst = mean = float("nan")
    total = n + sum(rec.errors.values())
    return Result(
        protocol=protocol,
        concurrency=concurrency,
        duration_s=duration_s,
        requests=n,
        errors=dict(rec.errors),
        rps=n / duration_s,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=worst,
        mean_ms=mean,
        client_cpu_us=cpu_s / total * 1e6 if total else float("nan"),
    )


async def closed_loop(
    sends: list[Send], duration_s: float, warmup_s: float
) -> tuple[Recorder, float]:
    """Run one client per `send` (len(sends) = concurrency); return the record and CPU seconds.

    CPU time is this process's, measured over the whole run and scaled to the window, as a
    check that the load generator stays cheap beside the server.
    """
    rec = Recorder()
    start = time.perf_counter_ns()
    record_ns = start + int(warmup_s * 1e9)
    window = Window(record_ns, record_ns + int(duration_s * 1e9))
    cpu0 = time.process_time()
    await asyncio.gather(*(_client(s, window, rec) for s in sends))
    cpu = (time.process_time() - cpu0) * duration_s / max(duration_s + warmup_s, 1e-9)
    return rec, cpu


async def _arrival(
    scheduled_ns: int, senders: asyncio.Queue[Send], window: Window, rec: Recorder
) -> None:
    send = await senders.get()  # every connection busy: the request waits here, and that counts
    try:
        label = await send()
    finally:
        senders.put_nowait(send)
    if window.record_ns <= scheduled_ns <= window.end_ns:
        rec.add(label, time.perf_counter_ns() - scheduled_ns)


async def open_loop(
    sends: list[Send], rate_rps: float, duration_s: float, warmup_s: float, seed: int = 0
) -> tuple[Recorder, float]:
    """Poisson arrivals at `rate_rps` over as many connections as `sends` (at most that many
    requests in flight); latency counts from each request's scheduled arrival, so a server that
    falls behind is charged for the wait (no coordinated omission). Requests scheduled inside
    the window count, whenever they complete."""
    rec = Recorder()
    senders: asyncio.Queue[Send] = asyncio.Queue()
    for send in sends:
        senders.put_nowait(send)
    rng = np.random.default_rng(seed)
    start = time.perf_counter_ns()
    record_ns = start + int(warmup_s * 1e9)
    window = Window(record_ns, record_ns + int(duration_s * 1e9))
    cpu0 = time.process_time()
    tasks: list[asyncio.Task[None]] = []
    scheduled = float(start)
    while True:
        scheduled += rng.exponential(1e9 / rate_rps)
        if scheduled >= window.end_ns:
            break
        delay = (scheduled - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_arrival(int(scheduled), senders, window, rec)))
    await asyncio.gather(*tasks)
    cpu = (time.process_time() - cpu0) * duration_s / max(duration_s + warmup_s, 1e-9)
    return rec, cpu


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (cheaper per request), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
