"""The per-request latency objective on the wire: `latency_slo_ms` and `max_quality_loss`.

v2 HTTP and gRPC carry them as request parameters, the OpenAI routes as extension fields of the
body; each codec calls `take_slo` once, so they become typed fields of the InferRequest and
nothing downstream reads them from `parameters` (policies/slo.py decides with them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import MutableMapping
from typing import Any

from slimserve.errors import InvalidArgument
from slimserve.types import InferRequest

LATENCY_SLO_MS = "latency_slo_ms"
MAX_QUALITY_LOSS = "max_quality_loss"
_MAX_SLO_MS = 3_600_000.0  # an hour: beyond it, an objective means nothing


def _number(key: str, value: Any, low: float, high: float, fix: str) -> float:
    """A finite number in [low, high] from an int, float or numeric string (gRPC strings)."""
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if not (low <= number <= high):
        shown = repr(value)[:40]
        raise InvalidArgument(f"parameter '{key}' = {shown}: {fix}")
    return number


def take_slo(params: MutableMapping[str, Any], request: InferRequest) -> None:
    """Move the objective out of `params` into `request.latency_slo_ms` / `max_quality_loss`."""
    slo = params.pop(LATENCY_SLO_MS, None)
    loss = params.pop(MAX_QUALITY_LOSS, None)
    if slo is None:
        if loss is not None:
            raise InvalidArgument(
                f"parameter '{MAX_QUALITY_LOSS}' needs '{LATENCY_SLO_MS}': the budget says how "
                f"much quality a request trades for speed; add {LATENCY_SLO_MS} (milliseconds)"
            )
        return
    request.latency_slo_ms = _number(
        LATENCY_SLO_MS,
        slo,
        1e-3,
        _MAX_SLO_MS,
        f"give the latency objective in milliseconds, a number > 0 and <= {_MAX_SLO_MS:.0f}",
    )
    if loss is not None:
        request.max_quality_loss = _number(
            MAX_QUALITY_LOSS,
            loss,
            0.0,
            100.0,
            "give the points of quality (accuracy or agreement, 0-100) the request may give "
            "up against the original, e.g. 1.0",
        )
