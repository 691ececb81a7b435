"""Request controls: parsed once from the parameters, typed, and every mistake named."""

from __future__ import annotations

from typing import Any

import pytest

from slimserve.errors import InvalidArgument
from slimserve.transport.controls import take_controls, with_deadline
from slimserve.types import NO_CONTROLS, RequestControls


def test_controls_leave_the_parameters_typed() -> None:
    params: dict[str, Any] = {
        "timeout": "2.5",
        "priority": "3",
        "degrade": "true",
        "variant": "int8",
        "max_tokens": 4,
    }
    variant, controls = take_controls(params)
    assert variant == "int8"
    assert controls == RequestControls(timeout_s=2.5, priority=3, degrade=True)
    assert params == {"max_tokens": 4}  # what the model itself reads stays


def test_no_controls_is_the_shared_default() -> None:
    params = {"max_tokens": 4}
    assert take_controls(params) == (None, NO_CONTROLS) and params == {"max_tokens": 4}


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"timeout": "soon"}, "parameter 'timeout'"),
        ({"timeout": True}, "parameter 'timeout'"),
        ({"priority": "urgent"}, "parameter 'priority'"),
        ({"priority": 1.5}, "parameter 'priority'"),
        ({"degrade": "maybe"}, "parameter 'degrade'"),
        ({"variant": 3}, "parameter 'variant'"),
    ],
)
def test_a_wrong_control_is_a_400_naming_it(params: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgument, match=named):
        take_controls(params)


def test_the_nearer_of_timeout_and_call_deadline_wins() -> None:
    assert with_deadline(NO_CONTROLS, None) is NO_CONTROLS
    assert with_deadline(NO_CONTROLS, 2.0).timeout_s == 2.0
    assert with_deadline(RequestControls(timeout_s=1.0), 2.0).timeout_s == 1.0
    assert with_deadline(RequestControls(timeout_s=3.0, priority=2), 2.0) == RequestControls(
        timeout_s=2.0, priority=2
    )
