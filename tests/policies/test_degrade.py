"""Variant choice under pressure, with hysteresis on the way back."""

from __future__ import annotations

import math

from slimserve.policies.degrade import Candidate, DegradeState, DemandRate, choose, pick_cheapest

VARIANTS = [
    Candidate("int8", cost=2.0, quality_loss=0.3),
    Candidate("pruned", cost=1.0, quality_loss=2.5),
    Candidate("bf16", cost=4.0, quality_loss=0.01),
]


def test_cheapest_within_the_quality_budget_wins():
    assert pick_cheapest(VARIANTS, 5.0, max_quality_loss=1.0).name == "int8"
    assert pick_cheapest(VARIANTS, 5.0, max_quality_loss=5.0).name == "pruned"
    assert pick_cheapest(VARIANTS, 1.5, max_quality_loss=0.1) is None  # none cheaper and good


def test_unhealthy_variants_are_skipped():
    sick = [Candidate("int8", 2.0, 0.3, healthy=False), VARIANTS[2]]
    assert pick_cheapest(sick, 5.0, 1.0).name == "bf16"


def test_degrades_under_pressure_and_returns_only_after_calm():
    state = DegradeState()
    assert choose(state, 0.0, False, VARIANTS, 5.0, 1.0) is None
    assert choose(state, 1.0, True, VARIANTS, 5.0, 1.0, recover_s=3) == "int8"
    assert choose(state, 2.0, False, VARIANTS, 5.0, 1.0, recover_s=3) == "int8"  # calm begins
    assert choose(state, 4.0, False, VARIANTS, 5.0, 1.0, recover_s=3) == "int8"  # not long enough
    assert choose(state, 4.5, True, VARIANTS, 5.0, 1.0, recover_s=3) == "int8"  # pressure again
    assert choose(state, 5.0, False, VARIANTS, 5.0, 1.0, recover_s=3) == "int8"
    assert choose(state, 8.0, False, VARIANTS, 5.0, 1.0, recover_s=3) is None  # back


def test_a_degraded_variant_that_turns_unhealthy_is_dropped():
    state = DegradeState()
    choose(state, 0.0, True, VARIANTS, 5.0, 1.0)
    sick = [Candidate("int8", 2.0, 0.3, healthy=False)]
    assert choose(state, 1.0, False, sick, 5.0, 1.0) is None


def test_demand_rate_tracks_arrivals_and_decays_without_them():
    demand = DemandRate(tau_s=1.0)
    assert demand.rate(0.0) == 0.0
    for i in range(400):  # 100 rows/s for 4 s
        demand.observe(i / 100)
    assert 90 < demand.rate(4.0) < 110
    assert demand.rate(7.0) < 100 * math.exp(-2.5)  # no arrivals for 3 s: mostly forgotten
    demand.observe(7.0, rows=50)  # a request's rows count, not just the request
    assert demand.rate(7.0) > 50
