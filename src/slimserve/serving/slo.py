"""Gathers what policies/slo.py needs to choose the unit for a request with a latency objective.

For each unit of the asked version (the original and its variants): the quality it gives up
(its variant.yaml profile), its batch latency curve (the profile's `latency_ms_by_batch`; for
an original, its profile.yaml from `slimserve profile`, else what its batcher measured while
serving) and the state of its queue now; where the profile measured the serving path
(`slimserve profile`'s open-loop points), the queueing model the planner uses, for the tail a
request adds at the server's current request rate. The response then says which unit
answered, what it was predicted to take and whether the objective was reachable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slimserve.policies.queueing import ServiceModel, from_profile
from slimserve.policies.slo import Choice, Option, batch_latency_ms, choose
from slimserve.repository.schema import VariantProfile
from slimserve.runtimes.base import TextGenerator
from slimserve.serving.batcher import Batcher
from slimserve.serving.models import ModelEntry, State, Unit
from slimserve.types import RequestControls

Curve = tuple[tuple[int, float], ...]
# The live slowdown needs a few batches, and is bounded: one stalled batch must not send
# every request elsewhere, nor a fast burst make a unit look faster than it is.
_SLOWDOWN_SAMPLES, _SLOWDOWN_MIN, _SLOWDOWN_MAX = 5, 0.5, 20.0
# The most of its capacity the serving path is taken to run at (see tail_ms).
_BUSIEST = 0.99


def quality_loss(unit: Unit) -> float | None:
    """Points given up against the original, from the variant's profile (0: the original)."""
    if unit.target.variant is None:
        return 0.0
    info = unit.target.info
    return None if info is None else info.profile.quality_loss()


def _curve(unit: Unit) -> Curve:
    profile = unit.target.profile
    curve = profile.latency_curve() if profile is not None else ()
    batcher = unit.batcher
    if not curve and batcher is not None and batcher.estimate.samples >= 3:
        estimate = batcher.estimate  # measured while serving: one point, its usual batch
        curve = ((max(1, round(estimate.batch_rows)), estimate.batch_s * 1000.0),)
    return curve


def overhead_ms(profile: VariantProfile | None, curve: Curve) -> float:
    """Time a lone request spends outside the model: the profile's one-client sweep p50
    (end to end, over HTTP) less the in-process batch-1 latency; 0 without a sweep."""
    sweep = (profile.model_extra or {}).get("sweep") if profile is not None else None
    one = batch_latency_ms(curve, 1)
    if not isinstance(sweep, list) or one is None:
        return 0.0
    lone = [p["p50_ms"] for p in sweep if isinstance(p, dict) and p.get("concurrency") == 1]
    lone = [float(ms) for ms in lone if isinstance(ms, int | float)]
    return max(0.0, min(lone) - one) if lone else 0.0


def slowdown(batcher: Batcher, curve: Curve) -> float:
    """How much slower than its profile the unit runs now: its recent batch time (EWMA) over
    the profile's at the same rows, within [_SLOWDOWN_MIN, _SLOWDOWN_MAX]; 1 without data."""
    estimate = batcher.estimate
    if estimate.samples < _SLOWDOWN_SAMPLES:
        return 1.0
    profiled = batch_latency_ms(curve, max(1, round(estimate.batch_rows)))
    if not profiled:
        return 1.0
    return min(_SLOWDOWN_MAX, max(_SLOWDOWN_MIN, estimate.batch_s * 1000.0 / profiled))


def service_model(unit: Unit) -> ServiceModel | None:
    """The unit's queueing model from its profile (policies/queueing.py), made once per
    profile (the serving path's fit takes milliseconds); None without a sweep or curve."""
    profile = unit.target.profile
    if unit.service is not None and unit.service[0] is profile:
        return unit.service[1]
    model = None
    if profile is not None and profile.model_extra:
        batching = unit.target.config.batching
        size, delay = batching.max_batch_size, batching.max_queue_delay_ms
        model = from_profile(profile.model_extra, profile.latency_curve(), size, delay)
    unit.service = (profile, model)
    return model


def tail_ms(model: ServiceModel | None, rate_rps: float) -> float:
    """What a request's 99th percentile adds beyond the work the queue shows now: the lone
    request's spread (one-client p99 - p50) and the serving path's p99 at `rate_rps` (the
    server's requests/s now); 0 where the profile has no open-loop points. Past the rate the
    profile says the serving path sustains, its wait at 99% of that rate: long, but finite,
    so that units still rank by their work."""
    if model is None or model.serving is None:
        return 0.0
    spread = max(0.0, model.lone_p99_ms - model.lone_p50_ms)
    path = model.serving
    if path.per_request_ms > 0:
        rate_rps = min(rate_rps, _BUSIEST * 1000.0 / path.per_request_ms)
    return spread + path.p99_ms(rate_rps)


def left_ms(batcher: Batcher, factor: float, curve: Curve) -> float:
    """What is left of the batch the unit has on (or waiting for) its thread now (ms)."""
    if not batcher.running_rows:
        return 0.0
    full = batch_latency_ms(curve, batcher.running_rows)
    full = batcher.estimate.batch_s * 1000.0 if full is None else full * factor
    running_s = batcher.running_for_s()
    if running_s is None:  # still waiting for its thread
        return full
    return max(0.0, full - running_s * 1000.0)


def option(unit: Unit, loss: float, healthy: bool, neighbours: list[Unit]) -> Option:
    """The unit as policies/slo.py sees it: profile, queue now, health; `neighbours`: the
    other resident units, whose batches on the same inference thread run first."""
    batching = unit.target.config.batching
    curve = _curve(unit)
    batcher = unit.batcher
    running, queued, fill, factor = 0.0, 0, 1, 1.0
    if batcher is not None:
        factor = slowdown(batcher, curve)
        running = left_ms(batcher, factor, curve)
        queued, fill = batcher.queued_rows, batcher.fill_rows()
    busy = sum(
        left_ms(n.batcher, slowdown(n.batcher, c), c)
        for n in neighbours
        if n is not unit and n.batcher is not None and n.executor is unit.executor
        for c in (_curve(n),)
    )
    load_ms = unit.cold_load_s * 1000.0 if unit.cold_load_s is not None else None
    rate = sum(n.batcher.arrival_rate_rps() for n in neighbours if n.batcher is not None)
    return Option(
        variant=unit.target.variant,
        quality_loss=loss,
        latency_ms_by_batch=curve,
        loaded=unit.state is State.READY,
        healthy=healthy and unit.state is not State.UNAVAILABLE,
        running_left_ms=running,
        thread_busy_ms=busy if unit.executor is not None else 0.0,
        queued_rows=queued,
        max_batch_size=batching.max_batch_size,
        batch_delay_ms=batching.max_queue_delay_ms,
        fill_rows=fill,
        slowdown=factor,
        overhead_ms=overhead_ms(unit.target.profile, curve),
        tail_ms=tail_ms(service_model(unit), rate),
        load_ms=load_ms,
    )


def choose_unit(
    entry: ModelEntry,
    original: Unit,
    controls: RequestControls,
    rows: int,
    healthy: Callable[[Unit], bool],
    resident: list[Unit],
    times: tuple[float, float],
) -> tuple[Unit, Choice]:
    """The unit to answer a request whose controls carry latency_slo_ms, and the choice;
    `resident`: every resident unit (they share inference threads); `times`: when the request
    arrived and now (the engine's clock, seconds)."""
    assert controls.latency_slo_ms is not None
    arrived, now = times
    units = {var: u for (ver, var), u in entry.units.items() if ver == original.target.version}
    options = []
    for unit in units.values():
        loss = quality_loss(unit)
        if loss is not None:
            options.append(option(unit, loss, healthy(unit), resident))
    budget = controls.max_quality_loss
    if budget is None:
        budget = original.target.config.degrade.max_quality_loss
    choice = choose(options, controls.latency_slo_ms, budget, rows, arrived, now)
    return units[choice.variant], choice


# Continuous batching: a new stream joins the running ones at once, never a "full batch".
_LLM_SLOTS = 1 << 20


def llm_option(unit: Unit, loss: float, healthy: bool, steps: int) -> Option | None:
    """A language-model unit for the objective: `steps` decode steps (the tokens to generate,
    plus one for the prompt) at the step time of the streams it would run with (its running
    and waiting ones, plus this one), from the profile `slimserve optimize` writes (decode
    step at 1 and at 8 streams); None without that profile."""
    profile = unit.target.profile
    if profile is None or not profile.latency_ms_batch1:
        return None
    curve: list[tuple[int, float]] = [(1, profile.latency_ms_batch1 * steps)]
    eight = (profile.model_extra or {}).get("decode_tokens_per_s_8_streams")
    if isinstance(eight, int | float) and eight > 0:
        curve.append((8, 8e3 / eight * steps))
    streams = 0
    if isinstance(unit.runtime, TextGenerator) and unit.state is State.READY:
        stats = unit.runtime.generation_stats()
        streams = stats.running + stats.waiting
    return Option(
        variant=unit.target.variant,
        quality_loss=loss,
        latency_ms_by_batch=tuple(curve),
        loaded=unit.state is State.READY,
        healthy=healthy and unit.state is not State.UNAVAILABLE,
        queued_rows=streams,
        max_batch_size=_LLM_SLOTS,
        load_ms=unit.cold_load_s * 1000.0 if unit.cold_load_s is not None else None,
    )


def choose_llm_unit(
    entry: ModelEntry,
    original: Unit,
    controls: RequestControls,
    steps: int,
    healthy: Callable[[Unit], bool],
    times: tuple[float, float],
) -> tuple[Unit, Choice]:
    """The language-model unit for a generation whose controls carry latency_slo_ms: the
    whole completion (up to max_tokens) within the objective, by the same rule as tensors."""
    assert controls.latency_slo_ms is not None
    units = {var: u for (ver, var), u in entry.units.items() if ver == original.target.version}
    options = []
    for unit in units.values():
        loss = quality_loss(unit)
        made = None if loss is None else llm_option(unit, loss, healthy(unit), steps)
        if made is not None:
            options.append(made)
    if not any(o.variant is None for o in options):  # the original answers when none fits
        options.append(Option(None, 0.0, ()))
    budget = controls.max_quality_loss
    if budget is None:
        budget = original.target.config.degrade.max_quality_loss
    choice = choose(options, controls.latency_slo_ms, budget, 1, *times)
    return units[choice.variant], choice


def response_parameters(choice: Choice | None) -> dict[str, Any]:
    """What the answer says about the objective: the variant that answered ('' for the
    original), whether the objective was reachable, and the prediction (ms) when there was
    one; None: the request named a variant, which answered as named, so the objective was
    not considered (`slo_considered: false`)."""
    if choice is None:
        return {"slo_considered": False}
    out: dict[str, Any] = {
        "slo_considered": True,
        "slo_variant": choice.variant or "",
        "slo_reachable": choice.met,
    }
    if choice.predicted_ms is not None:
        out["predicted_latency_ms"] = round(choice.predicted_ms, 3)
    return out
