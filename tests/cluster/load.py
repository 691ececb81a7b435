"""A bounded closed-loop load of v2 inferences over httpx, counting answers and failures."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@dataclass
class Load:
    """`threads` clients, each with its own keep-alive connection, sending one request after
    another to `url` until stopped (or `max_s` passed)."""

    url: str
    threads: int = 4
    max_s: float = 60.0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    replicas: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(30)

    def total(self) -> int:
        with self._lock:
            return self.ok + sum(self.errors.values())

    def wait_for(self, count: int, timeout: float = 60) -> None:
        """Until `count` more requests have finished (answered or failed)."""
        target, deadline = self.total() + count, time.monotonic() + timeout
        while self.total() < target and time.monotonic() < deadline:
            time.sleep(0.05)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    resp = client.post(self.url, json=BODY)
                except httpx.HTTPError as exc:
                    outcome, replica = type(exc).__name__, None
                else:
                    outcome = "ok" if resp.status_code == 200 else f"HTTP {resp.status_code}"
                    replica = resp.headers.get("slimserve-replica")
                with self._lock:
                    if outcome == "ok":
                        self.ok += 1
                    else:
                        self.errors[outcome] += 1
                    if replica:
                        self.replicas[replica] += 1
