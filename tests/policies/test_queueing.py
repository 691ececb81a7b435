"""The open-loop latency model against cases worked out by hand (arithmetic in comments)."""

from __future__ import annotations

import math

import pytest

from slimserve.policies.planning import Demand, Machines, Point, Unit, plan
from slimserve.policies.queueing import (
    OpenLoopPoint,
    ServiceModel,
    ServingPath,
    SweepPoint,
    batch_rows,
    calibrate,
    capacity_rps,
    fit_serving_path,
    from_profile,
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


# The serving path: an open-loop request costs 1 ms more than a closed-loop lone one, and the
# server's own serial work is 0.5 ms a request.
PATH = ServingPath(extra_ms=1.0, per_request_ms=0.5)


def test_the_serving_path_is_an_md1_queue_in_front_of_the_model():
    # 1000 req/s: rho = 0.5; mean wait 0.5 / 0.5 / 2 * 0.5 = 0.25 ms; its p99 0.25 / 0.5 *
    # ln(50) = 1.956 ms; plus the extra 1 ms.
    assert PATH.p99_ms(1000) == pytest.approx(1.0 + 0.5 * math.log(50))
    assert PATH.p99_ms(5) == 1.0  # rho 0.0025: nobody waits
    assert math.isinf(PATH.p99_ms(2000))  # rho = 1
    # Added to the model's p99: 100 req/s of BATCHED is 4.9 ms (above); rho 0.05, mean wait
    # 0.05 / 0.95 / 2 * 0.5 = 0.013158 ms, p99 0.013158 / 0.05 * ln(5) = 0.42354 ms.
    with_path = ServiceModel(((1, 2.0), (8, 9.0)), 8, 3.0, 3.0, 0.0, PATH)
    assert p99_ms(with_path, 100) == pytest.approx(4.9 + 1.0 + 0.42354, abs=1e-4)
    # The path also caps the throughput: 1000 / 0.5 ms = 2000 req/s, above the model's
    # 8 rows / 9 ms = 889 req/s here, so the model's cap holds.
    assert with_path.saturation_rps == pytest.approx(8000 / 9)
    slow = ServiceModel(((1, 2.0), (8, 9.0)), 8, 3.0, 3.0, 0.0, ServingPath(0.0, 2.0))
    assert slow.saturation_rps == pytest.approx(500.0)


def test_the_serving_path_is_fitted_on_what_open_loop_points_leave_over():
    # Measured p99 = the model's + PATH's at 100 and 300 req/s: the fit finds c and e again
    # (c on a grid of 1000 / 300 / 2000 ms steps).
    points = [OpenLoopPoint(r, p99_ms(BATCHED, r) + PATH.p99_ms(r)) for r in (100.0, 300.0)]
    fitted = fit_serving_path(BATCHED, points)
    assert fitted is not None
    assert fitted.per_request_ms == pytest.approx(0.5, abs=0.002)
    assert fitted.extra_ms == pytest.approx(1.0, abs=0.01)
    # Weighted by the requests each measured: a p99 of few requests, 30 ms off, moves little.
    noisy = [*points, OpenLoopPoint(200.0, p99_ms(BATCHED, 200) + PATH.p99_ms(200) + 30, 1e-6)]
    refit = fit_serving_path(BATCHED, noisy)
    assert refit is not None and refit.extra_ms == pytest.approx(1.0, abs=0.01)
    # One point: no slope to fit; the extra is its residual. None: nothing usable.
    one = fit_serving_path(BATCHED, [OpenLoopPoint(100.0, 7.0)])
    assert one == ServingPath(pytest.approx(7.0 - 4.9), 0.0)
    assert fit_serving_path(BATCHED, [OpenLoopPoint(1000.0, 7.0)]) is None  # model: inf


def test_the_fitted_extra_is_never_negative():
    # Points under the model's own p99 (4.9 ms at 100 req/s, 5.7 at 300): the least-squares
    # extra would be < 0, which would predict under a lone request's p99 at low rates; it is
    # held at 0, and c fits what is left (here nothing: 0).
    low = [OpenLoopPoint(100.0, 4.0), OpenLoopPoint(300.0, 4.2)]
    assert p99_ms(BATCHED, 300.0) > 4.2
    fitted = fit_serving_path(BATCHED, low)
    assert fitted == ServingPath(0.0, 0.0)
    assert fit_serving_path(BATCHED, low[:1]) == ServingPath(0.0, 0.0)


def test_a_model_is_made_from_the_rows_slimserve_profile_writes():
    # A lone client 3 ms flat; the busiest point (4 clients, batches of 4 = 5 ms) at 800 req/s
    # gives h = 1000 / 800 - 5 / 4 = 0; the open-loop points are PATH's over that model.
    sweep = [
        {"concurrency": 1, "throughput_rps": 300.0, "p50_ms": 3.0, "p99_ms": 3.0},
        {"concurrency": 4, "throughput_rps": 800.0, "p50_ms": 5.0, "p99_ms": 6.0},
    ]
    batching = {"max_batch_size": 8, "max_queue_delay_ms": 1.0, "errors": 0}
    rows = [{**r, **batching} for r in sweep]
    opened = [
        {"rate_rps": r, "throughput_rps": r, "p99_ms": p99_ms(BATCHED, r) + PATH.p99_ms(r)}
        for r in (100.0, 300.0)
    ]
    other = {**rows[1], "max_batch_size": 32, "throughput_rps": 5000.0}  # another batching
    extra = {"sweep": [*rows, other], "open_loop": [{**o, **batching} for o in opened]}
    model = from_profile(extra, BATCHED.batch_ms, 8, 1.0)
    assert model is not None
    assert (model.lone_p50_ms, model.lone_p99_ms, model.per_request_ms) == (3.0, 3.0, 0.0)
    assert model.serving is not None
    assert model.serving.per_request_ms == pytest.approx(0.5, abs=0.002)
    assert model.serving.extra_ms == pytest.approx(1.0, abs=0.01)
    assert from_profile({"open_loop": extra["open_loop"]}, BATCHED.batch_ms, 8, 1.0) is None
    assert from_profile(extra, (), 8, 1.0) is None  # no batch latency curve


def test_the_planner_adds_the_serving_path_to_the_expected_p99():
    # The hand calculation above: 100 req/s within 7 ms -> 6.3235 ms expected; the capacity
    # within 7 ms drops below the bare model's (the path adds 1 ms and more as rho grows).
    served = ServiceModel(((1, 2.0), (8, 9.0)), 8, 3.0, 3.0, 0.0, PATH)
    unit = Unit("m", None, 0.0, 1 << 20, (Point(500, 4.0),), 2, served)
    (m,) = plan([Demand("m", 100, 7.0, 0.0)], [unit], Machines(2, 1 << 30, 1)).models
    assert m.expected_p99_ms == pytest.approx(6.3235, abs=1e-4) and m.serving == PATH
    assert m.capacity_rps < capacity_rps(BATCHED, 7.0)
    assert p99_ms(served, m.capacity_rps) == pytest.approx(7.0, abs=1e-3)
