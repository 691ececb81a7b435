"""Shedding decisions and the service-time estimate."""

from __future__ import annotations

import pytest

from slimserve.policies.shedding import ServiceEstimate, should_shed


def test_estimate_follows_batches_and_predicts_the_wait():
    est = ServiceEstimate(alpha=0.5)
    assert est.expected_wait_s(100, 8) == 0.0  # no data yet: admit
    est.update(rows=8, seconds=0.010)
    assert est.expected_wait_s(16, 8) == pytest.approx(0.020)  # two batches ahead
    est.update(rows=8, seconds=0.030)
    assert est.batch_s == pytest.approx(0.020)


def test_admits_when_there_is_room_and_time():
    assert should_shed(3, 100, 0.01, max_wait_s=0.5, time_left_s=1.0) is None


def test_full_queue_sheds_with_a_retry_hint():
    shed = should_shed(100, 100, 0.2, None, None)
    assert shed is not None and "queue is full" in shed.reason and shed.retry_after_s == 0.2


def test_a_wait_longer_than_the_request_timeout_sheds_now():
    shed = should_shed(10, 100, 0.5, None, time_left_s=0.1)
    assert shed is not None and "remaining timeout" in shed.reason


def test_a_wait_longer_than_the_model_limit_sheds():
    shed = should_shed(10, 100, 0.5, max_wait_s=0.2, time_left_s=None)
    assert shed is not None and "limit of 200 ms" in shed.reason
