"""Request controls: the v2 parameters that say how a request is handled, parsed once.

Both codecs call `take_controls` on a request's parameters: it removes `timeout`,
`priority`, `degrade`, `variant`, `latency_slo_ms` and `max_quality_loss` (the per-request
objective, policies/slo.py) and returns them typed (slimserve.types.RequestControls),
so the engine reads fields, never parameters. A wrong type is a 400 naming the parameter and
what to send. `timeout` arrives here in seconds (each codec converts Triton's integer
microseconds); whether it has already passed is the engine's decision, on its clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

from slimserve.errors import InvalidArgument
from slimserve.types import NO_CONTROLS, RequestControls

LATENCY_SLO_MS, MAX_QUALITY_LOSS = "latency_slo_ms", "max_quality_loss"
CONTROL_PARAMETERS = frozenset(
    {"timeout", "priority", "degrade", "variant", LATENCY_SLO_MS, MAX_QUALITY_LOSS}
)
_MAX_SLO_MS = 3_600_000.0  # an hour: beyond it, an objective means nothing


def take_controls(params: dict[str, Any]) -> tuple[str | None, RequestControls]:
    """Pop the control parameters out of `params`: (variant, controls)."""
    if not params or params.keys().isdisjoint(CONTROL_PARAMETERS):
        return None, NO_CONTROLS  # the common case: nothing to parse
    variant = _variant(params.pop("variant", None))
    controls = RequestControls(
        timeout_s=_timeout(params.pop("timeout", None)),
        priority=_priority(params.pop("priority", None)),
        degrade=_flag(params.pop("degrade", None)),
        **_objective(params.pop(LATENCY_SLO_MS, None), params.pop(MAX_QUALITY_LOSS, None)),
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


def _objective(slo: Any, loss: Any) -> dict[str, float | None]:
    """latency_slo_ms (ms, > 0) and max_quality_loss (points, 0-100; needs latency_slo_ms)."""
    if slo is None:
        if loss is not None:
            raise InvalidArgument(
                f"parameter '{MAX_QUALITY_LOSS}' needs '{LATENCY_SLO_MS}': the budget says how "
                f"much quality a request trades for speed; add {LATENCY_SLO_MS} (milliseconds)"
            )
        return {}
    fix = f"give the latency objective in milliseconds, a number > 0 and <= {_MAX_SLO_MS:.0f}"
    out: dict[str, float | None] = {
        LATENCY_SLO_MS: _number(LATENCY_SLO_MS, slo, 1e-3, _MAX_SLO_MS, fix)
    }
    if loss is not None:
        fix = (
            "give the points of quality (accuracy or agreement, 0-100) the request may give "
            "up against the original, e.g. 1.0"
        )
        out[MAX_QUALITY_LOSS] = _number(MAX_QUALITY_LOSS, loss, 0.0, 100.0, fix)
    return out


def _number(key: str, value: Any, low: float, high: float, fix: str) -> float:
    """A finite number in [low, high] from an int, float or numeric string (gRPC strings)."""
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if not (low <= number <= high):
        raise InvalidArgument(f"parameter '{key}' = {_shown(value)}: {fix}")
    return number


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."
