"""The inference threads: each loaded unit runs all its batches on one of them.

A shared ThreadPoolExecutor hands each batch to whichever of its threads is idle, so a model's
batches wander between threads. For torch that costs speed: OpenMP keeps one team of worker
threads per calling thread, and once libgomp manages more threads than there are cores it cuts
its spin-waiting to a token 100 spins. Measured (MiniLM, batch 16, 2 intra-op threads, 2
cores, OpenMP allowed to spin): 37.9 ms a batch from one thread, 48.1 ms when two threads take
turns (what the shared pool did), 48.8 ms with spinning off. So units are assigned to threads
at load time, and a unit's warm-up runs on its thread too.

Which thread: the one whose units cost least in all, by their profiled batch latency. Units
on one thread run their batches one after another, so a 0.1 ms variant sharing a thread with
a 4 ms original waits up to 4 ms behind each of its batches: with 3 units on 2 threads, the
count-balanced assignment put a pruned variant beside the original it was meant to be the
fast way around (per-request objectives met 38% against 69% for serving the variant alone).
Balancing the cost puts it beside the next-cheapest unit instead.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


class InferenceThreads:
    """`count` single-thread executors; `assign` gives a unit the least-loaded one."""

    def __init__(self, count: int) -> None:
        self._executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"slimserve-infer-{i}")
            for i in range(max(1, count))
        ]
        self._costs: list[dict[str, float]] = [{} for _ in self._executors]  # unit key: ms
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._executors)

    def assign(self, key: str, cost_ms: float | None = None) -> ThreadPoolExecutor:
        """The thread whose units' costs sum least (fewest units, then the lowest index, on
        a tie) for the unit `key`. `cost_ms`: how long the unit holds a thread per batch (its
        profiled batch latency); None (not profiled) counts as the costliest unit assigned so
        far: it may be as heavy as any."""
        with self._lock:
            known = [c for costs in self._costs for c in costs.values()]
            cost = cost_ms if cost_ms is not None else max(known, default=1.0)
            i = min(
                range(len(self._costs)),
                key=lambda j: (sum(self._costs[j].values()), len(self._costs[j]), j),
            )
            self._costs[i][key] = max(0.0, cost)
            return self._executors[i]

    def release(self, key: str) -> None:
        with self._lock:
            for costs in self._costs:
                costs.pop(key, None)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        for executor in self._executors:
            executor.shutdown(wait=wait, cancel_futures=cancel_futures)
