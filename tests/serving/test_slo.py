"""What serving/slo.py reads from live batchers and profiles for the objective's prediction
(the choice itself: tests/policies/test_slo.py; end to end: tests/e2e/test_slo.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from slimserve.repository.schema import VariantProfile
from slimserve.serving.batcher import Batcher
from slimserve.serving.slo import left_ms, overhead_ms, slowdown
from slimserve.testing import FakeClock

CURVE = ((1, 2.0), (8, 8.0))  # profile: ms per batch of 1 and 8 rows


def batcher(clock: FakeClock) -> Batcher:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()  # never run here: only the batcher's bookkeeping is read
    return Batcher(dict, pool, max_batch_size=8, max_delay_s=0.001, max_queue=8, clock=clock)


def test_what_is_left_of_a_running_batch_counts_from_when_it_started_on_its_thread():
    clock = FakeClock()
    b = batcher(clock)
    assert left_ms(b, 1.0, CURVE) == 0.0  # nothing running
    b.running_rows = 8
    assert left_ms(b, 1.0, CURVE) == 8.0  # waiting for its thread: all of it is ahead
    b.running_started_ns = int(clock.now * 1e9)
    clock.now += 0.003
    assert left_ms(b, 1.0, CURVE) == pytest.approx(5.0)
    assert left_ms(b, 2.0, CURVE) == pytest.approx(13.0)  # twice slower than profiled now
    clock.now += 1.0
    assert left_ms(b, 1.0, CURVE) == 0.0  # overdue: about to finish


def test_slowdown_is_the_live_batch_time_over_the_profiles_bounded():
    b = batcher(FakeClock())
    assert slowdown(b, CURVE) == 1.0  # no batches yet
    for _ in range(5):
        b.estimate.update(1, 0.006)  # 6 ms for a batch the profile says takes 2
    assert slowdown(b, CURVE) == pytest.approx(3.0)
    for _ in range(50):
        b.estimate.update(1, 1.0)
    assert slowdown(b, CURVE) == 20.0  # one stall must not send everything elsewhere


def test_overhead_is_the_lone_clients_p50_beyond_the_models_batch_1_latency():
    sweep = [
        {"concurrency": 1, "p50_ms": 3.5, "p99_ms": 9.0},
        {"concurrency": 8, "p50_ms": 20.0, "p99_ms": 40.0},
    ]
    assert overhead_ms(VariantProfile(sweep=sweep), CURVE) == pytest.approx(1.5)
    assert overhead_ms(VariantProfile(), CURVE) == 0.0  # no sweep: nothing added
    assert overhead_ms(VariantProfile(sweep=sweep[1:]), CURVE) == 0.0  # no one-client point
