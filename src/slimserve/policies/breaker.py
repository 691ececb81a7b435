"""Circuit breaker per served variant: closed, open, half-open.

Closed: calls pass; outcomes are recorded in a sliding window of the last `window` calls. The
breaker opens on `consecutive_failures` failures in a row, or when at least `min_calls` are in
the window and the error rate or the slow-call rate (latency above `slow_call_s`) reaches its
threshold. Open: calls fail fast until `open_s` has passed. Half-open: up to `probe_calls`
calls pass; if they all succeed the breaker closes, one failure opens it again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    consecutive_failures: int = 5
    error_rate: float = 0.5  # fraction of failed calls in the window that opens the breaker
    slow_call_s: float | None = None  # None: latency does not count
    slow_rate: float = 0.8
    window: int = 50
    min_calls: int = 20
    open_s: float = 5.0
    probe_calls: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.error_rate <= 1 or not 0 < self.slow_rate <= 1:
            raise ValueError("error_rate and slow_rate are fractions in (0, 1]")
        if min(self.consecutive_failures, self.window, self.min_calls, self.probe_calls) < 1:
            raise ValueError("counts in a breaker config must be at least 1")


@dataclass
class CircuitBreaker:
    config: BreakerConfig = field(default_factory=BreakerConfig)
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    _streak: int = 0
    _calls: deque[tuple[bool, bool]] = field(default_factory=deque)  # (failed, slow)
    _failed: int = 0  # failed calls in the window (kept, not recounted: O(1) per call)
    _slow: int = 0
    _probes_out: int = 0
    _probes_ok: int = 0

    def allow(self, now: float) -> bool:
        """May a call go through now? (Half-open admits a limited number of probes.)"""
        if self.state is BreakerState.OPEN:
            if now - self.opened_at < self.config.open_s:
                return False
            self.state, self._probes_out, self._probes_ok = BreakerState.HALF_OPEN, 0, 0
        if self.state is BreakerState.HALF_OPEN:
            if self._probes_out >= self.config.probe_calls:
                return False
            self._probes_out += 1
        return True

    def blocking(self, now: float) -> bool:
        """True while open and not yet due for a probe (no state change)."""
        return self.state is BreakerState.OPEN and now - self.opened_at < self.config.open_s

    def retry_after(self, now: float) -> float:
        return max(0.0, self.opened_at + self.config.open_s - now)

    def record(self, now: float, ok: bool, latency_s: float = 0.0) -> None:
        """Record the outcome of a call that `allow` let through."""
        slow = self.config.slow_call_s is not None and latency_s > self.config.slow_call_s
        if self.state is BreakerState.HALF_OPEN:
            self._record_probe(now, ok and not slow)
            return
        if self.state is BreakerState.OPEN:
            return  # a call admitted before the breaker opened
        self._streak = 0 if ok else self._streak + 1
        self._calls.append((not ok, slow))
        self._failed += not ok
        self._slow += slow
        if len(self._calls) > self.config.window:
            old_failed, old_slow = self._calls.popleft()
            self._failed -= old_failed
            self._slow -= old_slow
        if self._should_open():
            self._open(now)

    def _record_probe(self, now: float, ok: bool) -> None:
        if not ok:
            self._open(now)
            return
        self._probes_ok += 1
        if self._probes_ok >= self.config.probe_calls:
            self.state, self._streak = BreakerState.CLOSED, 0
            self._forget()

    def _should_open(self) -> bool:
        c = self.config
        if self._streak >= c.consecutive_failures:
            return True
        n = len(self._calls)
        if n < c.min_calls:
            return False
        return self._failed / n >= c.error_rate or (
            c.slow_call_s is not None and self._slow / n >= c.slow_rate
        )

    def _open(self, now: float) -> None:
        self.state, self.opened_at = BreakerState.OPEN, now
        self._streak = 0
        self._forget()

    def _forget(self) -> None:
        self._calls.clear()
        self._failed = self._slow = 0
