"""Token buckets, driven by a clock the test controls."""

from __future__ import annotations

import pytest

from slimserve.policies.rate_limit import Bucket, KeyedLimiter, Limit, take


def test_burst_then_refill_at_the_rate():
    limit = Limit(rate=10, burst=3)
    bucket = Bucket(tokens=3, updated=0.0)
    assert [take(limit, bucket, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = take(limit, bucket, 0.0)
    assert wait == pytest.approx(0.1)  # one token refills in 1/rate seconds
    assert take(limit, bucket, 0.05) == pytest.approx(0.05)
    assert take(limit, bucket, 0.1) == 0.0


def test_tokens_never_exceed_the_burst():
    limit = Limit(rate=100, burst=2)
    bucket = Bucket(tokens=0, updated=0.0)
    assert take(limit, bucket, 1000.0) == 0.0
    assert take(limit, bucket, 1000.0) == 0.0
    assert take(limit, bucket, 1000.0) > 0


def test_keys_have_their_own_buckets():
    limiter = KeyedLimiter(Limit(rate=1, burst=1))
    assert limiter.acquire("alice", 0.0) == 0.0
    assert limiter.acquire("alice", 0.0) > 0
    assert limiter.acquire("bob", 0.0) == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 5), (1, 0)])
def test_impossible_limits_are_refused(rate, burst):
    with pytest.raises(ValueError, match="rate limit"):
        Limit(rate=rate, burst=burst)
