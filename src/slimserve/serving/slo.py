"""Gathers what policies/slo.py needs to choose the unit for a request with a latency objective.

For each unit of the asked version (the original and its variants): the quality it gives up
(its variant.yaml profile), its batch latency curve (the profile's `latency_ms_by_batch`; for
an original, its profile.yaml from `slimserve profile`, else what its batcher measured while
serving) and the state of its queue now. The response then says which unit answered, what it
was predicted to take and whether the objective was reachable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slimserve.policies.slo import Choice, Option, choose
from slimserve.repository.schema import VariantProfile
from slimserve.serving.models import ModelEntry, State, Unit
from slimserve.types import RequestControls

Curve = tuple[tuple[int, float], ...]


def quality_loss(unit: Unit) -> float | None:
    """Points given up against the original, from the variant's profile (0: the original)."""
    if unit.target.variant is None:
        return 0.0
    info = unit.target.info
    return None if info is None else info.profile.quality_loss()


def profile_curve(profile: VariantProfile | None) -> Curve:
    """(batch rows, ms) pairs from a profile, sorted by rows; empty without a profile."""
    if profile is None:
        return ()
    by_batch = (profile.model_extra or {}).get("latency_ms_by_batch")
    points: list[tuple[int, float]] = []
    if isinstance(by_batch, dict):
        for size, ms in by_batch.items():
            if str(size).isdigit() and isinstance(ms, int | float) and ms > 0:
                points.append((int(size), float(ms)))
    if not points and profile.latency_ms_batch1:
        points.append((1, float(profile.latency_ms_batch1)))
    return tuple(sorted(points))


def _curve(unit: Unit) -> Curve:
    curve = profile_curve(unit.target.profile)
    batcher = unit.batcher
    if not curve and batcher is not None and batcher.estimate.samples >= 3:
        estimate = batcher.estimate  # measured while serving: one point, its usual batch
        curve = ((max(1, round(estimate.batch_rows)), estimate.batch_s * 1000.0),)
    return curve


def option(unit: Unit, loss: float, healthy: bool) -> Option:
    """The unit as policies/slo.py sees it: profile, queue now, health."""
    batching = unit.target.config.batching
    batcher = unit.batcher
    wait_ms, queued = 0.0, 0
    if batcher is not None:
        wait_ms = batcher.expected_wait_s() * 1000.0
        if batcher.running_rows:  # a batch on the runtime now: the next one starts after it
            wait_ms += batcher.estimate.batch_s * 1000.0
        queued = batcher.queued_rows
    load_ms = unit.cold_load_s * 1000.0 if unit.cold_load_s is not None else None
    return Option(
        variant=unit.target.variant,
        quality_loss=loss,
        latency_ms_by_batch=_curve(unit),
        loaded=unit.state is State.READY,
        healthy=healthy and unit.state is not State.UNAVAILABLE,
        queue_wait_ms=wait_ms,
        queued_rows=queued,
        max_batch_size=batching.max_batch_size,
        batch_delay_ms=batching.max_queue_delay_ms,
        load_ms=load_ms,
    )


def choose_unit(
    entry: ModelEntry,
    original: Unit,
    controls: RequestControls,
    rows: int,
    healthy: Callable[[Unit], bool],
    arrived: float,
    now: float,
) -> tuple[Unit, Choice]:
    """The unit to answer a request whose controls carry latency_slo_ms, and the choice."""
    assert controls.latency_slo_ms is not None
    units = {var: u for (ver, var), u in entry.units.items() if ver == original.target.version}
    options = []
    for unit in units.values():
        loss = quality_loss(unit)
        if loss is not None:
            options.append(option(unit, loss, healthy(unit)))
    budget = controls.max_quality_loss
    if budget is None:
        budget = original.target.config.degrade.max_quality_loss
    choice = choose(options, controls.latency_slo_ms, budget, rows, arrived, now)
    return units[choice.variant], choice


def response_parameters(choice: Choice) -> dict[str, Any]:
    """What the answer says about the choice: the variant ('' for the original), whether the
    objective was reachable, and the prediction (ms) when there was one."""
    out: dict[str, Any] = {"slo_variant": choice.variant or "", "slo_reachable": choice.met}
    if choice.predicted_ms is not None:
        out["predicted_latency_ms"] = round(choice.predicted_ms, 3)
    return out
