"""When to restart a dead worker process, and when to stop trying (a crash loop).

Each worker slot keeps the times its process died. A death is answered with a restart after an
exponential backoff (base, doubling per recent death, capped), so a worker that fails at start
does not spin the CPU; more than `max_restarts` deaths within `window_s` is a crash loop: the
supervisor stops retrying and says why. A worker that stays up longer than `window_s` earns
its slate back, since its old deaths fall out of the window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RestartConfig:
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0
    max_restarts: int = 5  # deaths within window_s that are still restarted
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("need 0 <= base_delay_s <= max_delay_s")
        if self.max_restarts < 0 or self.window_s <= 0:
            raise ValueError("max_restarts must be >= 0 and window_s > 0")


@dataclass(frozen=True, slots=True)
class Restart:
    """Start the slot's process again at `at` (seconds, the caller's clock)."""

    at: float
    attempt: int  # deaths in the window, this one included


@dataclass(frozen=True, slots=True)
class GiveUp:
    """A crash loop: stop restarting; `reason` says what happened, for the log and the exit."""

    reason: str


@dataclass
class RestartState:
    """The deaths of one worker slot still inside the window (oldest first)."""

    deaths: deque[float] = field(default_factory=deque)


def on_death(
    config: RestartConfig, state: RestartState, now: float, exit_code: int | None
) -> Restart | GiveUp:
    """Record a death at `now` and decide: restart after a backoff, or give up."""
    while state.deaths and now - state.deaths[0] > config.window_s:
        state.deaths.popleft()
    state.deaths.append(now)
    attempt = len(state.deaths)
    if attempt > config.max_restarts:
        return GiveUp(
            f"died {attempt} times within {config.window_s:g} s (last exit code "
            f"{exit_code}); a crash loop, not restarted again: see the worker's log above"
        )
    delay = min(config.max_delay_s, config.base_delay_s * 2 ** (attempt - 1))
    return Restart(at=now + delay, attempt=attempt)
