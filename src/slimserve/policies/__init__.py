"""Pure decisions with the clock passed in: rate limits, circuit breakers, shedding.

Nothing here sleeps, reads a clock or does I/O; callers pass `now` (seconds, monotonic), so
tests drive every policy step by step.
"""
