"""Autoscaling decisions driven step by step with a test clock (no sleeps)."""

from __future__ import annotations

import pytest

from slimserve.policies.autoscale import (
    AutoscaleConfig,
    AutoscaleState,
    Signals,
    decide,
    wanted_replicas,
)

CONFIG = AutoscaleConfig(
    min_replicas=1, max_replicas=3, target_in_flight=4, max_queue_delay_s=0.5,
    upscale_delay_s=2, downscale_delay_s=10,
)  # fmt: skip


def test_in_flight_over_the_target_asks_for_more_bounded_by_max():
    assert wanted_replicas(CONFIG, Signals(1, in_flight=4)) == 1
    assert wanted_replicas(CONFIG, Signals(1, in_flight=5)) == 2
    assert wanted_replicas(CONFIG, Signals(1, in_flight=100)) == 3
    assert wanted_replicas(CONFIG, Signals(2, in_flight=0)) == 1


def test_a_long_queue_delay_asks_for_one_more_even_at_low_in_flight():
    assert wanted_replicas(CONFIG, Signals(1, in_flight=2, queue_delay_s=0.8)) == 2


def test_scale_up_only_after_the_wish_held_for_the_upscale_delay():
    state = AutoscaleState()
    busy = Signals(1, in_flight=10)
    assert decide(CONFIG, state, 0.0, busy) == 1
    assert decide(CONFIG, state, 1.9, busy) == 1
    assert decide(CONFIG, state, 2.0, busy) == 3


def test_a_break_in_the_wish_restarts_the_delay():
    state = AutoscaleState()
    assert decide(CONFIG, state, 0.0, Signals(1, in_flight=10)) == 1
    assert decide(CONFIG, state, 1.0, Signals(1, in_flight=1)) == 1  # the burst is over
    assert decide(CONFIG, state, 2.5, Signals(1, in_flight=10)) == 1  # a new wish from 2.5
    assert decide(CONFIG, state, 4.5, Signals(1, in_flight=10)) == 3


def test_scale_down_to_the_minimum_after_the_downscale_delay():
    state = AutoscaleState()
    idle = Signals(3, in_flight=0)
    assert decide(CONFIG, state, 0.0, idle) == 3
    assert decide(CONFIG, state, 9.0, idle) == 3
    assert decide(CONFIG, state, 10.0, idle) == 1


def test_outside_the_bounds_moves_at_once():
    assert decide(CONFIG, AutoscaleState(), 0.0, Signals(5, in_flight=100)) == 3
    assert decide(CONFIG, AutoscaleState(), 0.0, Signals(0, in_flight=0)) == 1


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="min_replicas"):
        AutoscaleConfig(min_replicas=3, max_replicas=2)
