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
import gc
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
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
    late_ns: list[int] = field(default_factory=list)  # open loop: how late each request left

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
    late_p99_ms: float = float("nan")  # open loop: p99 of how late requests left (no server)

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


@contextmanager
def no_collector_pauses() -> Iterator[None]:
    """The load generator's own garbage collector off for a bounded run: a full collection
    over a heap of imported libraries stops the event loop for milliseconds, and every
    request in flight then counts that pause as the server's latency (a tail the server did
    not cause). What exists beforehand is frozen out of later collections; what the run leaves
    behind in cycles is collected once after it."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.unfreeze()
        gc.collect()


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
        late_p99_ms=float(np.percentile(rec.late_ns, 99)) / 1e6 if rec.late_ns else float("nan"),
    )


async def closed_loop(
    sends: list[Send], duration_s: float, warmup_s: float
) -> tuple[Recorder, float]:
    """Run one client per `send` (len(sends) = concurrency); return the record and CPU seconds.

    CPU time is this process's, measured over the whole run and scaled to the window, as a
    check that the load generator stays cheap beside the server.
    """
    rec = Recorder()
    with no_collector_pauses():
        start = time.perf_counter_ns()
        record_ns = start + int(warmup_s * 1e9)
        window = Window(record_ns, record_ns + int(duration_s * 1e9))
        cpu0 = time.process_time()
        await asyncio.gather(*(_client(s, window, rec) for s in sends))
        cpu = (time.process_time() - cpu0) * duration_s / max(duration_s + warmup_s, 1e-9)
    return rec, cpu


def poisson_schedule(start_ns: int, end_ns: int, rate_rps: float, seed: int) -> list[int]:
    """Poisson arrival instants (perf_counter_ns) in [start_ns, end_ns) at `rate_rps`."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    t = float(start_ns)
    while True:
        t += rng.exponential(1e9 / rate_rps)
        if t >= end_ns:
            return out
        out.append(int(t))


def _pace(
    loop: asyncio.AbstractEventLoop, times_ns: list[int], launch: Callable[[int, int], None]
) -> None:
    """On a thread of its own: wake at each instant and have the loop call launch(i, t)."""
    perf = time.perf_counter_ns
    for i, t in enumerate(times_ns):
        wait_ns = t - perf()
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        loop.call_soon_threadsafe(launch, i, t)


async def paced(times_ns: list[int], launch: Callable[[int, int], None]) -> None:
    """Call `launch(i, scheduled_ns)` on the running loop at each scheduled instant.

    Why a thread: an event loop's timers are millisecond-grained (uvloop rounds a delay to
    whole ms; asyncio's epoll wait rounds its timeout up to one), so a request scheduled 0.3 ms
    ahead left 0-1.5 ms late, and that lateness, counted from the scheduled arrival, landed in
    every latency measured (at 1,200 req/s it was most of a 1.6 ms p50). `time.sleep` wakes
    within about 0.1 ms, and `call_soon_threadsafe` wakes the loop at once."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _pace, loop, times_ns, launch)


async def _arrival(
    scheduled_ns: int, senders: asyncio.Queue[Send], window: Window, rec: Recorder
) -> None:
    send = await senders.get()  # every connection busy: the request waits here, and that counts
    rec.late_ns.append(time.perf_counter_ns() - scheduled_ns)
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
    requests in flight), each sent at its instant (`paced`); latency counts from each
    request's scheduled arrival, so a server that falls behind is charged for the wait (no
    coordinated omission). Requests scheduled inside the window count, whenever they complete.
    The recorder also keeps how late each request left (the generator's own error, plus any
    wait for a free connection)."""
    rec = Recorder()
    senders: asyncio.Queue[Send] = asyncio.Queue()
    for send in sends:
        senders.put_nowait(send)
    tasks: list[asyncio.Task[None]] = []
    with no_collector_pauses():
        start = time.perf_counter_ns()
        record_ns = start + int(warmup_s * 1e9)
        window = Window(record_ns, record_ns + int(duration_s * 1e9))
        cpu0 = time.process_time()

        def launch(_: int, scheduled_ns: int) -> None:
            tasks.append(asyncio.ensure_future(_arrival(scheduled_ns, senders, window, rec)))

        await paced(poisson_schedule(start, window.end_ns, rate_rps, seed), launch)
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
