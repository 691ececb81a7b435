"""Circuit breaker transitions, step by step with a test clock."""

from __future__ import annotations

from slimserve.policies.breaker import BreakerConfig, BreakerState, CircuitBreaker


def test_consecutive_failures_open_then_half_open_probes_close():
    b = CircuitBreaker(BreakerConfig(consecutive_failures=3, open_s=10, probe_calls=2))
    for t in range(3):
        assert b.allow(t)
        b.record(t, ok=False)
    assert b.state is BreakerState.OPEN
    assert not b.allow(5.0)
    assert b.retry_after(5.0) == 7.0
    assert b.allow(12.5) and b.state is BreakerState.HALF_OPEN
    assert b.allow(12.5)
    assert not b.allow(12.5)  # only probe_calls probes at a time
    b.record(12.6, ok=True)
    b.record(12.6, ok=True)
    assert b.state is BreakerState.CLOSED


def test_a_failed_probe_opens_again():
    b = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_s=1))
    b.allow(0)
    b.record(0, ok=False)
    assert b.allow(1.5)
    b.record(1.5, ok=False)
    assert b.state is BreakerState.OPEN and b.opened_at == 1.5


def test_error_rate_opens_only_after_min_calls():
    b = CircuitBreaker(BreakerConfig(consecutive_failures=100, error_rate=0.5, min_calls=10))
    for i in range(9):
        b.record(i, ok=i % 2 == 0)
    assert b.state is BreakerState.CLOSED
    b.record(9, ok=False)  # 5 of 10 failed
    assert b.state is BreakerState.OPEN


def test_slow_calls_open_when_latency_counts():
    b = CircuitBreaker(BreakerConfig(slow_call_s=0.1, slow_rate=0.5, min_calls=4))
    for i in range(4):
        b.record(i, ok=True, latency_s=0.5)
    assert b.state is BreakerState.OPEN


def test_successes_keep_it_closed():
    b = CircuitBreaker()
    for i in range(1000):
        assert b.allow(i)
        b.record(i, ok=i % 10 != 0)
    assert b.state is BreakerState.CLOSED


def test_blocking_only_while_open_and_not_due_for_a_probe():
    b = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_s=2))
    assert not b.blocking(0)
    b.record(0, ok=False)
    assert b.blocking(1.0) and not b.blocking(2.5)
    assert b.state is BreakerState.OPEN  # asking changes nothing
