"""The open-loop latency model against cases worked out by hand (arithmetic in comments)."""

from __future__ import annotations

import math

import pytest

from slimserve.policies.planning import Demand, Machines, Point, Unit, plan
from slimserve.policies.queueing import (
    ServiceModel,
    SweepPoint,
    batch_rows,
    calibrate,
    capacity_rps,
    p99_ms,
    utilization,
)

# Batched: S(b) = 2 + (b - 1) ms for b in 1..8, no per-request cost, a lone request 3 ms flat.
BATCHED = ServiceModel(((1, 2.0), (8, 9.0)), 8, 3.0, 3.0, 0.0)
# One request at a time: 4 ms each; a lone request 5 ms median, sigma 1 ms (p99 = 5 + 2.326).
SINGLE = ServiceModel(((1, 4.0),), 1, 5.0, 5.0 + 2.326, 0.0)


def test_light_load_waits_for_the_rest_of_a_running_batch_at_most():
    # 100 req/s: batches of 1 (0.1 * 2 ms < 1 row), busy 20% of the time; p99 of the wait:
    # 2 ms * (1 - 0.01 / 0.2) = 1.9 ms; p99 = 3 + 1.9.
    assert batch_rows(BATCHED, 100) == 1.0
    assert utilization(BATCHED, 100) == pytest.approx(0.2)
    assert p99_ms(BATCHED, 100) == pytest.approx(4.9)


def test_heavier_load_grows_the_batch_until_the_largest_cannot_keep_up():
    # 600 req/s: b = 0.6 * (2 + b - 1) -> b = 1.5 rows, T = 2.5 ms, always busy; the wait's
    # p99 2.5 * 0.99, its own batch 0.5 ms longer than a lone one: 3 + 0.5 + 2.475.
    assert batch_rows(BATCHED, 600) == pytest.approx(1.5)
    assert p99_ms(BATCHED, 600) == pytest.approx(5.975)
    # 1000 req/s: b = b + 1 has no solution up to 8 rows: 8 rows take 9 ms, > 8 ms of arrivals.
    assert math.isinf(p99_ms(BATCHED, 1000))
    # The highest rate within 6 ms: with k = rate / 1000, T = 1 / (1 - k) and
    # p99 = 1 + 1.99 T = 6 -> T = 5 / 1.99, k = 1 - 1.99 / 5 = 0.602.
    assert capacity_rps(BATCHED, 6.0) == pytest.approx(602.0, abs=0.01)
    assert capacity_rps(BATCHED, 2.9) == 0.0  # below a lone request


def test_without_batching_it_is_an_mg1_queue_with_kingmans_wait_and_an_exponential_tail():
    # 100 req/s of 4 ms: rho 0.4; cs^2 = (1 / 5)^2 = 0.04; E[W] = 0.4/0.6 * 1.04/2 * 4 ms;
    # p99 of the wait E[W] / 0.4 * ln(40); with the lone spread 2.326 as root of squares.
    wait = 0.4 / 0.6 * 1.04 / 2 * 4 / 0.4 * math.log(40)
    assert p99_ms(SINGLE, 100) == pytest.approx(5.0 + math.hypot(2.326, wait))
    assert math.isinf(p99_ms(SINGLE, 250))  # rho = 1


def test_calibration_takes_the_lone_request_and_the_per_request_cost_from_the_sweep():
    points = [SweepPoint(1, 200, 5.0, 7.0), SweepPoint(8, 400, 18.0, 30.0)]
    model = calibrate(points, ((1, 2.0), (8, 9.0)), 8)
    # The busiest point: 400 req/s -> 2.5 ms a request, of which the model's 9/8 per row:
    # h = 2.5 - 1.125 = 1.375 ms, so the model sustains 8 / (9 + 8 * 1.375) ms = 400 req/s.
    assert (model.lone_p50_ms, model.lone_p99_ms) == (5.0, 7.0)
    assert model.per_request_ms == pytest.approx(1.375)
    assert model.saturation_rps == pytest.approx(400.0)


def test_the_planner_uses_the_model_for_capacity_and_expected_p99():
    unit = Unit("m", None, 0.0, 1 << 20, (Point(500, 4.0),), 2, BATCHED)
    (m,) = plan([Demand("m", 600, 6.0, 0.0)], [unit], Machines(2, 1 << 30, 1)).models
    assert m.capacity_rps == pytest.approx(602.0, abs=0.01)  # not the sweep's 500
    assert (m.replicas, m.expected_p99_ms) == (1, pytest.approx(5.975))
