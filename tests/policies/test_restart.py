"""Worker restart backoff and crash-loop detection, step by step with a test clock."""

from __future__ import annotations

import pytest

from slimserve.policies.restart import GiveUp, Restart, RestartConfig, RestartState, on_death


def test_backoff_doubles_up_to_the_cap_then_a_crash_loop_gives_up():
    config = RestartConfig(base_delay_s=1, max_delay_s=3, max_restarts=3, window_s=60)
    state = RestartState()
    assert on_death(config, state, 0.0, 1) == Restart(at=1.0, attempt=1)
    assert on_death(config, state, 2.0, 1) == Restart(at=4.0, attempt=2)
    assert on_death(config, state, 5.0, 1) == Restart(at=8.0, attempt=3)  # 4 s capped at 3
    decision = on_death(config, state, 9.0, -9)
    assert isinstance(decision, GiveUp)
    assert "died 4 times within 60 s" in decision.reason and "exit code -9" in decision.reason


def test_deaths_older_than_the_window_are_forgiven():
    config = RestartConfig(base_delay_s=1, max_delay_s=10, max_restarts=1, window_s=30)
    state = RestartState()
    assert isinstance(on_death(config, state, 0.0, 1), Restart)
    assert on_death(config, state, 31.0, 1) == Restart(at=32.0, attempt=1)
    assert isinstance(on_death(config, state, 40.0, 1), GiveUp)


def test_a_bad_config_is_refused():
    with pytest.raises(ValueError, match="base_delay_s"):
        RestartConfig(base_delay_s=5, max_delay_s=1)
