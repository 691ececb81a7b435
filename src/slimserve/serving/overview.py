"""What the engine serves and how it is doing, as typed values for the web console.

`models` describes every model, version and variant (state, residency, measured profile, the
variants degradation may pick); `live_sample` reads the engine's Prometheus registry, the same
figures /metrics exposes, into cumulative counters and histogram buckets per model and variant.
Rates and windowed quantiles are differences of two samples, taken by the reader (as
Prometheus' `rate` and `histogram_quantile` do), so the server keeps no state per viewer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from slimserve.serving.admission import Admission
from slimserve.serving.models import ModelEntry, ModelManager, State, Unit


@dataclass(frozen=True, slots=True)
class UnitView:
    """One version, or one variant of it."""

    model: str
    version: int
    variant: str | None
    state: str  # UNLOADED | LOADING | READY | UNLOADING | UNAVAILABLE
    reason: str
    resident: bool
    resident_bytes: int | None  # what the residency table charges for it while loaded
    cold_load_s: float | None  # its last load, start to warmed up
    breaker: str  # closed | half_open | open
    backend: str
    recipe: str | None  # how a variant was made (variant.yaml)
    profile: dict[str, Any]  # size, latency per batch, accuracy/agreement (variant.yaml)
    degrade_target: bool  # within the quality budget and cheaper than its original
    queue_depth: int


@dataclass(frozen=True, slots=True)
class ModelView:
    name: str
    state: str
    reason: str
    task: str | None  # text-generation, embedding, ... (None: tensors in, tensors out)
    backend: str | None
    default_version: int | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    degrade_allowed: bool  # requests degrade by default (model.yaml degrade.allow)
    max_quality_loss: float
    degraded_now: bool  # its traffic is going to a variant at this moment
    units: list[UnitView] = field(default_factory=list)


def model_views(
    manager: ModelManager,
    admission: Admission,
    public: Callable[[str], str],
    allowed: Callable[[str], bool],
) -> list[ModelView]:
    """Every model `allowed(name)` lets the caller see, sorted by name."""
    views = []
    for name in sorted(manager.models):
        if allowed(name):
            views.append(_model(manager.models[name], admission, public))
    return views


def _model(entry: ModelEntry, admission: Admission, public: Callable[[str], str]) -> ModelView:
    config = entry.config
    originals = [u for (_, var), u in entry.units.items() if var is None]
    targets: set[str] = set()
    degraded = False
    for original in originals:
        targets.update(admission.degrade_options(entry, original))
        guard = admission.guards().get(original.target.key)  # none before its first request
        degraded = degraded or (guard is not None and guard.degrade.degraded)
    units = [
        _unit(u, admission, public, u.target.key in targets)
        for _, u in sorted(entry.units.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
    ]
    return ModelView(
        name=entry.name,
        state=entry.state.value,
        reason=public(entry.reason),
        task=config.task if config else None,
        backend=config.backend if config else None,
        default_version=entry.default_version(),
        inputs=[s.to_dict() for s in config.input_specs()] if config else [],
        outputs=[s.to_dict() for s in config.output_specs()] if config else [],
        degrade_allowed=bool(config and config.degrade.allow),
        max_quality_loss=config.degrade.max_quality_loss if config else 0.0,
        degraded_now=degraded,
        units=units,
    )


def _unit(unit: Unit, admission: Admission, public: Callable[[str], str], target: bool) -> UnitView:
    t = unit.target
    info = t.info
    recipe = None
    if info is not None and info.recipe is not None:
        recipe = info.recipe.get("text") if isinstance(info.recipe, dict) else str(info.recipe)
    profile = info.profile.model_dump(exclude_none=True) if info is not None else {}
    return UnitView(
        model=t.model,
        version=t.version,
        variant=t.variant,
        state=unit.state.value,
        reason=public(unit.reason),
        resident=unit.state is State.READY,
        resident_bytes=unit.resident.size_bytes if unit.resident is not None else None,
        cold_load_s=unit.cold_load_s,
        breaker=admission.breaker_state(unit).value,
        backend=t.backend,
        recipe=str(recipe) if recipe is not None else None,
        profile=_plain(profile),
        degrade_target=target,
        queue_depth=unit.batcher.queue_depth if unit.batcher is not None else 0,
    )


def _plain(value: Any) -> Any:
    """variant.yaml may hold anything YAML can: keep what JSON can carry."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# -- live figures ---------------------------------------------------------------------------

# Prometheus family -> the field of a unit's live record it fills.
_FIELDS = {
    "slimserve_generation_tokens": "tokens",
    "slimserve_degraded_requests": "degraded",
    "slimserve_queue_depth": "queue_depth",
    "slimserve_breaker_state": "breaker",
    "slimserve_generation_running_sequences": "running",
    "slimserve_generation_waiting_sequences": "waiting",
}
_HISTOGRAMS = {
    "slimserve_request_duration_seconds": "latency",
    "slimserve_batch_size_rows": "batch",
    "slimserve_generation_request_duration_seconds": "generation",
    "slimserve_generation_time_to_first_token_seconds": "ttft",
}


@dataclass(slots=True)
class Histogram:
    """Cumulative bucket counts (Prometheus `le` semantics), their sum and count."""

    le: list[float] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)
    sum: float = 0.0
    count: float = 0.0


@dataclass(slots=True)
class UnitLive:
    model: str
    variant: str  # '' for the original
    requests: float = 0.0  # finished v2 requests, every outcome
    errors: float = 0.0  # those that did not succeed
    degraded: float = 0.0  # answered by this variant because the original was under pressure
    tokens: float = 0.0  # generated tokens
    queue_depth: float = 0.0
    breaker: float = 0.0  # 0 closed, 1 half-open, 2 open
    running: float = 0.0  # sequences being decoded
    waiting: float = 0.0  # sequences queued for prefill
    generates: bool = False  # a language model (its generation engine reports sequences)
    histograms: dict[str, Histogram] = field(default_factory=dict)


@dataclass(slots=True)
class LiveSample:
    time_s: float  # wall clock (seconds since the epoch) when it was read
    memory_budget_bytes: float
    resident_bytes: float
    units: list[UnitLive]


def live_sample(registry: CollectorRegistry, allowed: Callable[[str], bool]) -> LiveSample:
    """The registry's figures now, per (model, variant) that `allowed(model)` lets through."""
    units: dict[tuple[str, str], UnitLive] = {}
    memory = {"slimserve_memory_budget_bytes": 0.0, "slimserve_resident_bytes": 0.0}

    def unit(labels: dict[str, str]) -> UnitLive | None:
        model = labels.get("model", "")
        if not model or model == "_other" or not allowed(model):
            return None
        key = (model, labels.get("variant", ""))
        found = units.get(key)
        if found is None:
            found = units[key] = UnitLive(*key)
        return found

    for family in registry.collect():
        name = family.name
        if name in memory:
            memory[name] = sum(s.value for s in family.samples)
        elif name == "slimserve_requests":
            _requests(family.samples, unit)
        elif name in _HISTOGRAMS:
            _histogram(family.samples, unit, _HISTOGRAMS[name])
        elif name in _FIELDS:
            _add(family.samples, unit, _FIELDS[name])
    return LiveSample(
        time.time(),
        memory["slimserve_memory_budget_bytes"],
        memory["slimserve_resident_bytes"],
        sorted(units.values(), key=lambda u: (u.model, u.variant)),
    )


def _requests(samples: Iterable[Any], unit: Callable[[dict[str, str]], UnitLive | None]) -> None:
    for s in samples:
        u = unit(s.labels)
        if u is None or not s.name.endswith("_total"):
            continue
        u.requests += s.value
        if s.labels.get("outcome") != "success":
            u.errors += s.value


def _add(
    samples: Iterable[Any], unit: Callable[[dict[str, str]], UnitLive | None], what: str
) -> None:
    for s in samples:
        u = unit(s.labels)
        if u is None or s.name.endswith("_created"):  # a counter's creation time
            continue
        setattr(u, what, getattr(u, what) + s.value)
        if what == "running":  # only generation engines report sequences
            u.generates = True


def _histogram(
    samples: Iterable[Any], unit: Callable[[dict[str, str]], UnitLive | None], what: str
) -> None:
    for s in samples:
        u = unit(s.labels)
        if u is None:
            continue
        h = u.histograms.setdefault(what, Histogram())
        if s.name.endswith("_bucket"):
            h.le.append(float(s.labels["le"]))  # "+Inf" -> inf (JSON: null, see the codec)
            h.counts.append(s.value)
        elif s.name.endswith("_sum"):
            h.sum = s.value
        elif s.name.endswith("_count"):
            h.count = s.value
