"""What serving/slo.py reads from live batchers and profiles for the objective's prediction
(the choice itself: tests/policies/test_slo.py; end to end: tests/e2e/test_slo.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from slimserve.policies.queueing import ServiceModel, ServingPath, from_profile, p99_ms
from slimserve.repository.schema import ModelConfig, VariantProfile
from slimserve.repository.store import Target
from slimserve.serving.batcher import Batcher
from slimserve.serving.models import Unit
from slimserve.serving.slo import left_ms, overhead_ms, service_model, slowdown, tail_ms
from slimserve.testing import FakeClock

CURVE = ((1, 2.0), (8, 8.0))  # profile: ms per batch of 1 and 8 rows


def batcher(clock: FakeClock, max_queue: int = 8) -> Batcher:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()  # never run here: only the batcher's bookkeeping is read
    return Batcher(
        dict, pool, max_batch_size=8, max_delay_s=0.001, max_queue=max_queue, clock=clock
    )


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


def test_the_arrival_rate_is_a_moving_average_of_the_gaps_that_a_silence_lowers():
    clock = FakeClock()
    b = batcher(clock, max_queue=1000)
    assert b.arrival_rate_rps() == 0.0  # nothing arrived yet

    async def arrive(n: int, gap_s: float) -> None:
        for _ in range(n):
            task = asyncio.ensure_future(b.submit({"x": np.zeros((1, 1))}, 1))
            await asyncio.sleep(0)  # queued (never run: the batcher is not started)
            task.cancel()
            clock.now += gap_s

    asyncio.run(arrive(200, 0.002))  # 500 req/s for long enough to forget the start
    clock.now -= 0.002  # read just after the last arrival
    assert b.arrival_rate_rps() == pytest.approx(500.0, rel=0.01)
    clock.now += 1.0  # a second of silence: at most 1 req/s now
    assert b.arrival_rate_rps() == pytest.approx(1.0, rel=0.01)


def test_the_tail_is_the_lone_spread_and_the_serving_paths_p99_at_the_rate():
    path = ServingPath(extra_ms=1.0, per_request_ms=0.5)
    model = ServiceModel(CURVE, 8, 3.0, 4.5, 0.0, path)
    # 1000 req/s: rho 0.5, the path's p99 1 + 0.5 ln 50 (tests/policies/test_queueing.py).
    assert tail_ms(model, 1000.0) == pytest.approx(1.5 + 1.0 + 0.5 * math.log(50))
    assert tail_ms(model, 5.0) == pytest.approx(1.5 + 1.0)  # nobody waits at 5 req/s
    # Past the path's capacity (2000 req/s): its p99 at 99% of it, finite.
    assert tail_ms(model, 5000.0) == pytest.approx(1.5 + path.p99_ms(0.99 * 2000.0))
    assert tail_ms(ServiceModel(CURVE, 8, 3.0, 4.5, 0.0), 1000.0) == 0.0  # no open-loop points
    assert tail_ms(None, 1000.0) == 0.0


def test_the_server_makes_the_units_model_from_its_profile_once_per_profile(tmp_path):
    # The rows `slimserve profile` writes: a lone client (3 ms, p99 4.5 ms), one busier
    # point, and open-loop points 2 ms over the bare model's p99: the fitted extra is ~2 ms.
    batching = {"max_batch_size": 8, "max_queue_delay_ms": 1.0, "errors": 0}
    sweep = [
        {"concurrency": 1, "throughput_rps": 300.0, "p50_ms": 3.0, "p99_ms": 4.5, **batching},
        {"concurrency": 4, "throughput_rps": 800.0, "p50_ms": 5.0, "p99_ms": 6.0, **batching},
    ]
    curve = {"1": 2.0, "8": 8.0}
    bare = from_profile({"sweep": sweep}, CURVE, 8, 1.0)
    assert bare is not None and bare.serving is None  # no open-loop points: no path
    opened = [
        {"rate_rps": r, "throughput_rps": r, "p99_ms": p99_ms(bare, r) + 2.0, **batching}
        for r in (20.0, 40.0)
    ]
    profile = VariantProfile(sweep=sweep, open_loop=opened, latency_ms_by_batch=curve)
    config = ModelConfig.model_validate(
        {
            "backend": "torch",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
            "batching": {"max_batch_size": 8, "max_queue_delay_ms": 1},
        }
    )
    unit = Unit(Target("m", 1, None, tmp_path, config, version_profile=profile))
    model = service_model(unit)
    assert model is not None and model.serving is not None
    assert model.serving.extra_ms == pytest.approx(2.0, abs=0.05)
    assert tail_ms(model, 0.0) == pytest.approx(1.5 + model.serving.extra_ms)
    assert service_model(unit) is model  # kept: the fit is not redone per request
    new = VariantProfile(sweep=sweep, latency_ms_by_batch=curve)  # re-read, say
    unit.target = dataclasses.replace(unit.target, version_profile=new)
    remade = service_model(unit)  # a new profile, here without open-loop points: no tail
    assert remade is not None and remade is not model and remade.serving is None
    assert tail_ms(remade, 0.0) == 0.0
