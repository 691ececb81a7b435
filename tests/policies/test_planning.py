"""The planner against a case worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import pytest

from slimserve.policies.planning import (
    Demand,
    Machines,
    PlanError,
    Point,
    Unit,
    capacity_rps,
    p99_at,
    plan,
)

MiB = 1 << 20
# Model a: the original sustains 500 req/s within 10 ms, its int8 variant 900 (both measured
# on 2 cores). Model b: only the original (0 loss allowed), 450 req/s within 5 ms.
A_ORIGINAL = Unit("a", None, 0.0, 100 * MiB, (Point(300, 4), Point(500, 8), Point(700, 15)), 2)
A_INT8 = Unit("a", "int8", 0.5, 50 * MiB, (Point(600, 3), Point(900, 6), Point(1200, 12)), 2)
A_PRUNED = Unit("a", "pruned", 4.0, 20 * MiB, (Point(2000, 2),), 2)
B_ORIGINAL = Unit("b", None, 0.0, 200 * MiB, (Point(250, 2), Point(450, 4.5)), 2)
UNITS = [A_ORIGINAL, A_INT8, A_PRUNED, B_ORIGINAL]
MACHINES = Machines(cores=2, memory_bytes=1024 * MiB, count=2)


def test_capacity_and_p99_read_off_the_sweep():
    assert capacity_rps(A_ORIGINAL.points, 10) == 500  # 700 req/s needs 15 ms
    assert capacity_rps(A_ORIGINAL.points, 3) == 0
    # 400 req/s between (250, 2 ms) and (450, 4.5 ms): 2 + 2.5 * 150 / 200 = 3.875 ms
    assert p99_at(B_ORIGINAL.points, 400, 5) == pytest.approx(3.875)
    assert p99_at(B_ORIGINAL.points, 100, 5) == 2  # below the lightest point: its p99


def test_small_case_matches_the_hand_calculation():
    demands = [Demand("a", 900, 10, 1.0), Demand("b", 400, 5, 0.0)]
    result = plan(demands, UNITS, MACHINES)
    a, b = result.models
    # a: original needs ceil(900/500) = 2 replicas, int8 ceil(900/900) = 1; pruned (4 points)
    # is over the 1-point budget. Cheapest: int8, 1 replica, p99 at 900 req/s = 6 ms.
    assert (a.variant, a.replicas, a.capacity_rps, a.expected_p99_ms) == ("int8", 1, 900, 6)
    # b: original, ceil(400/450) = 1 replica, p99 3.875 ms (above).
    assert (b.variant, b.replicas, b.expected_p99_ms) == (None, 1, pytest.approx(3.875))
    # Placement: a has the most unserved load (900 > 400): machine 0 (utilization 900/900 = 1);
    # then b to the least-loaded machine that fits: machine 1 (400/450 = 0.889).
    m0, m1 = result.machines
    assert m0.units == [("a", "int8", 900)] and m0.utilization == pytest.approx(1.0)
    assert m1.units == [("b", None, 400)] and m1.utilization == pytest.approx(400 / 450)
    assert (m0.memory_bytes, m1.memory_bytes) == (50 * MiB, 200 * MiB)


def test_replicas_split_the_rate_and_spread_over_machines():
    # 1,500 req/s of a within 10 ms, quality budget 1: int8 needs ceil(1500/900) = 2 replicas
    # of 750 each (p99 3 + 3 * 150/300 = 4.5 ms), one per machine, 750/900 of each.
    result = plan([Demand("a", 1500, 10, 1.0)], UNITS, MACHINES)
    (a,) = result.models
    assert (a.variant, a.replicas, a.per_replica_rps) == ("int8", 2, 750)
    assert a.expected_p99_ms == pytest.approx(4.5)
    assert [mp.units for mp in result.machines] == [[("a", "int8", 750)], [("a", "int8", 750)]]


def test_more_cores_scale_capacity():
    bigger = Machines(cores=4, memory_bytes=1024 * MiB, count=1)
    (a,) = plan([Demand("a", 1500, 10, 1.0)], UNITS, bigger).models
    assert (a.replicas, a.capacity_rps) == (1, 1800)  # 900 measured on 2 cores, x 4/2


def test_impossible_objective_names_the_field_and_the_fix():
    with pytest.raises(PlanError, match=r"models\.b\.p99_ms = 1: .*lowest measured p99 is 2"):
        plan([Demand("b", 100, 1, 0.0)], UNITS, MACHINES)
    with pytest.raises(PlanError, match=r"models\.b\.max_quality_loss"):
        plan(
            [Demand("b", 100, 10, 0.0)], [A_INT8, Unit("b", "x", 3.0, 1, (Point(9, 1),))], MACHINES
        )


def test_not_enough_machines_says_how_many():
    with pytest.raises(PlanError, match=r"needs 3 replicas .* raise machines.count to 3"):
        plan([Demand("b", 1300, 5, 0.0)], UNITS, MACHINES)
    small = Machines(cores=2, memory_bytes=220 * MiB, count=1)
    with pytest.raises(PlanError, match=r"no machine has room for replica 1 of a"):
        plan([Demand("a", 100, 10, 0.0), Demand("b", 100, 5, 0.0)], UNITS, small)
