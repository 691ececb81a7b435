"""The inference threads: each loaded unit runs all its batches on one of them.

A shared ThreadPoolExecutor hands each batch to whichever of its threads is idle, so a model's
batches wander between threads. For torch that costs speed: OpenMP keeps one team of worker
threads per calling thread, and once libgomp manages more threads than there are cores it cuts
its spin-waiting to a token 100 spins. Measured (MiniLM, batch 16, 2 intra-op threads, 2
cores, OpenMP allowed to spin): 37.9 ms a batch from one thread, 48.1 ms when two threads take
turns (what the shared pool did), 48.8 ms with spinning off. So units are assigned to threads
(the least-loaded one, at load time), and a unit's warm-up runs on its thread too.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


class InferenceThreads:
    """`count` single-thread executors; `assign` gives a unit the least-used one."""

    def __init__(self, count: int) -> None:
        self._executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"slimserve-infer-{i}")
            for i in range(max(1, count))
        ]
        self._units = [0] * len(self._executors)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._executors)

    def assign(self) -> ThreadPoolExecutor:
        with self._lock:
            i = min(range(len(self._units)), key=self._units.__getitem__)
            self._units[i] += 1
            return self._executors[i]

    def release(self, executor: ThreadPoolExecutor) -> None:
        with self._lock:
            i = self._executors.index(executor)
            self._units[i] = max(0, self._units[i] - 1)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        for executor in self._executors:
            executor.shutdown(wait=wait, cancel_futures=cancel_futures)
