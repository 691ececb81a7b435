"""Token-bucket rate limiting, per key (client identity, model).

A bucket holds up to `burst` tokens and refills at `rate` tokens per second; a request takes
`cost` tokens or is refused with the seconds until enough tokens will be there (Retry-After).
"""

from __future__ import annotations

from dataclasses import dataclass

from cachetools import LRUCache


@dataclass(frozen=True, slots=True)
class Limit:
    rate: float  # tokens per second
    burst: float  # bucket size: the most requests admitted at once after a quiet period

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError(
                "rate limit needs rate > 0 and burst >= 1, "
                f"got rate={self.rate}, burst={self.burst}"
            )


@dataclass(slots=True)
class Bucket:
    tokens: float
    updated: float  # seconds, the caller's monotonic clock


def take(limit: Limit, bucket: Bucket, now: float, cost: float = 1.0) -> float:
    """Refill `bucket` to `now` and take `cost` tokens if there are enough.

    Returns 0.0 when admitted, else the seconds until `cost` tokens will be available.
    """
    elapsed = max(0.0, now - bucket.updated)
    bucket.tokens = min(limit.burst, bucket.tokens + elapsed * limit.rate)
    bucket.updated = now
    if bucket.tokens >= cost:
        bucket.tokens -= cost
        return 0.0
    return (cost - bucket.tokens) / limit.rate


class KeyedLimiter:
    """One bucket per key, for at most `max_keys` keys (the least recently seen are dropped,
    which only ever makes a dropped key's next request more likely to pass)."""

    def __init__(self, limit: Limit, max_keys: int = 100_000) -> None:
        self.limit = limit
        self._buckets: LRUCache[str, Bucket] = LRUCache(maxsize=max_keys)

    def acquire(self, key: str, now: float, cost: float = 1.0) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = Bucket(self.limit.burst, now)
            self._buckets[key] = bucket
        return take(self.limit, bucket, now, cost)
