"""Shedding: refuse at once what could not be served in time, rather than time out late.

The service-time estimate is an exponentially weighted average of each batch's seconds per
row and of the batch size, so the expected wait of a new request is the work queued ahead of
it divided by the rate the model clears it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class ServiceEstimate:
    """EWMA of batch latency (s) and batch size (rows); `alpha` weighs the newest batch."""

    alpha: float = 0.2
    batch_s: float = 0.0
    batch_rows: float = 1.0
    samples: int = 0

    def update(self, rows: int, seconds: float) -> None:
        if self.samples == 0:
            self.batch_s, self.batch_rows = seconds, float(rows)
        else:
            a = self.alpha
            self.batch_s += a * (seconds - self.batch_s)
            self.batch_rows += a * (rows - self.batch_rows)
        self.samples += 1

    def expected_wait_s(self, queued_rows: int, max_batch: int) -> float:
        """Seconds until `queued_rows` rows ahead are done (0 with no data yet)."""
        if self.samples == 0 or queued_rows <= 0:
            return 0.0
        per_batch = max(1.0, min(self.batch_rows, float(max_batch or 1)))
        return math.ceil(queued_rows / per_batch) * self.batch_s


@dataclass(frozen=True, slots=True)
class Shed:
    """A refusal: why, and when a retry may succeed (seconds)."""

    reason: str
    retry_after_s: float


def should_shed(
    queued_rows: int,
    max_queue_rows: int,
    expected_wait_s: float,
    max_wait_s: float | None,
    time_left_s: float | None,
) -> Shed | None:
    """None to admit; a Shed when the queue is full or the wait would outlast the budget."""
    retry = max(0.05, expected_wait_s)
    if queued_rows >= max_queue_rows:
        return Shed(f"the model's queue is full ({queued_rows} rows waiting)", retry)
    if time_left_s is not None and expected_wait_s > time_left_s:
        return Shed(
            f"expected queue time {expected_wait_s * 1000:.0f} ms exceeds the request's "
            f"remaining timeout {time_left_s * 1000:.0f} ms",
            retry,
        )
    if max_wait_s is not None and expected_wait_s > max_wait_s:
        return Shed(
            f"expected queue time {expected_wait_s * 1000:.0f} ms exceeds the model's "
            f"limit of {max_wait_s * 1000:.0f} ms",
            retry,
        )
    return None
