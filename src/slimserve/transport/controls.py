"""Request controls: the v2 parameters that say how a request is handled, parsed once.

Both codecs call `take_controls` on a request's parameters: it removes `timeout`,
`priority`, `degrade` and `variant` and returns them typed (slimserve.types.RequestControls),
so the engine reads fields, never parameters. A wrong type is a 400 naming the parameter and
what to send. `timeout` arrives here in seconds (each codec converts Triton's integer
microseconds); whether it has already passed is the engine's decision, on its clock.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimserve.errors import InvalidArgument
from slimserve.types import NO_CONTROLS, RequestControls

CONTROL_PARAMETERS = frozenset({"timeout", "priority", "degrade", "variant"})


def take_controls(params: dict[str, Any]) -> tuple[str | None, RequestControls]:
    """Pop the control parameters out of `params`: (variant, controls)."""
    if not params or params.keys().isdisjoint(CONTROL_PARAMETERS):
        return None, NO_CONTROLS  # the common case: nothing to parse
    variant = _variant(params.pop("variant", None))
    controls = RequestControls(
        timeout_s=_timeout(params.pop("timeout", None)),
        priority=_priority(params.pop("priority", None)),
        degrade=_flag(params.pop("degrade", None)),
    )
    return variant, controls


def with_deadline(controls: RequestControls, time_remaining: float | None) -> RequestControls:
    """The call's deadline (a gRPC call's seconds left; None: none) as the request's timeout,
    keeping an earlier `timeout` the client set in the parameters."""
    if time_remaining is None:
        return controls
    current = controls.timeout_s
    timeout = time_remaining if current is None else min(current, time_remaining)
    return dataclasses.replace(controls, timeout_s=timeout)


def _variant(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidArgument("parameter 'variant' must be a string naming a variant")


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):  # True is not a number of seconds
        raise InvalidArgument(f"parameter 'timeout' = {_shown(value)} is not a number of seconds")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"parameter 'timeout' = {_shown(value)} is not a number of seconds"
        ) from None


def _priority(value: Any) -> int:
    if value is None:
        return 0
    message = f"parameter 'priority' = {_shown(value)}: use an integer (higher first)"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(message)
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(message) from None


def _flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InvalidArgument(f"parameter 'degrade' = {_shown(value)}: use true or false")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."
