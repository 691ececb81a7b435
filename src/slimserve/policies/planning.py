"""Capacity planning: which unit of each model to serve, how many replicas, on which machine.

Pure: inputs are the workload (rate, p99 objective, quality budget per model), the machines,
and each unit's measured sweep (`slimserve profile`: throughput and p99 per point).

1. Capacity of a unit under an objective: the highest Poisson arrival rate whose expected p99
   meets the objective, from the unit's queueing model calibrated on its profile
   (policies/queueing.py: M/G/1 with batches, Kingman's wait, an exponential tail). A unit
   whose profile has no batch latency curve falls back to the sweep as Model Analyzer reads
   it: the most throughput a measured point sustains with p99 <= the objective. Either is
   scaled by machine cores / cores where it was measured (compute is assumed to scale).
2. Variant choice in the manner of INFaaS: among the units within the quality budget that meet
   the objective at all, the cheapest: fewest replicas, then least memory, then least loss.
3. Replicas: ceil(rate / capacity), the rate split evenly; at most one replica of a model per
   machine (one server process holds one copy of a unit).
4. Placement in the manner of AlpaServe's greedy: repeatedly take the model with the most
   load not yet placed and put one replica on the least-loaded machine where it fits (memory,
   and compute utilization <= 1).
5. Expected p99 per model: the queueing model's at the per-replica rate (the fallback: the
   sweep's p99 at that throughput, linear between points, which ignores open-loop bursts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from slimserve.policies import queueing
from slimserve.policies.queueing import ServiceModel, ServingPath


class PlanError(ValueError):
    """The workload cannot be planned; the message names the field and the fix."""


@dataclass(frozen=True, slots=True)
class Point:
    throughput_rps: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class Unit:
    """A servable unit (an original or a variant) and what its profile measured."""

    model: str
    variant: str | None
    quality_loss: float
    memory_bytes: int
    points: tuple[Point, ...]
    cores: int = 1  # cores of the machine the sweep ran on
    service: ServiceModel | None = None  # the queueing model (None: read the sweep directly)

    def capacity_rps(self, p99_ms: float) -> float:
        """One replica's rate within the objective, on the machine it was measured on."""
        if self.service is not None:
            return queueing.capacity_rps(self.service, p99_ms)
        return capacity_rps(self.points, p99_ms)

    def lowest_p99_ms(self) -> float:
        """The p99 of a lone request: no objective below it can be met."""
        if self.service is not None:
            return queueing.p99_ms(self.service, 0.0)
        return min((p.p99_ms for p in self.points), default=math.inf)

    def p99_at(self, rate_rps: float, p99_ms: float) -> float:
        """Expected p99 at `rate_rps` (on the machine it was measured on)."""
        if self.service is not None:
            return queueing.p99_ms(self.service, rate_rps)
        return p99_at(self.points, rate_rps, p99_ms)


@dataclass(frozen=True, slots=True)
class Demand:
    model: str
    rate_rps: float
    p99_ms: float
    max_quality_loss: float


@dataclass(frozen=True, slots=True)
class Machines:
    cores: int
    memory_bytes: int
    count: int
    reserved_bytes: int = 0  # the server process itself, per machine


@dataclass(slots=True)
class ModelPlan:
    model: str
    variant: str | None
    replicas: int
    capacity_rps: float  # one replica's, at the objective, on these machines
    rate_rps: float  # the workload's (what the plan expects to serve)
    expected_p99_ms: float
    memory_bytes: int  # one replica's
    serving: ServingPath | None = None  # the fitted serving path the p99 includes

    @property
    def per_replica_rps(self) -> float:
        return self.rate_rps / self.replicas


@dataclass(slots=True)
class MachinePlan:
    index: int
    memory_bytes: int
    units: list[tuple[str, str | None, float]] = field(default_factory=list)  # model, var, rps
    utilization: float = 0.0  # share of the machine's compute the placed load takes


@dataclass(slots=True)
class Plan:
    models: list[ModelPlan]
    machines: list[MachinePlan]


def capacity_rps(points: tuple[Point, ...], p99_ms: float) -> float:
    """The most throughput a measured point sustains within the objective (0: none does)."""
    return max((p.throughput_rps for p in points if p.p99_ms <= p99_ms), default=0.0)


def p99_at(points: tuple[Point, ...], rate_rps: float, p99_ms: float) -> float:
    """p99 expected at `rate_rps`, linear between the points that meet the objective."""
    usable = sorted((p for p in points if p.p99_ms <= p99_ms), key=lambda p: p.throughput_rps)
    if not usable:
        return math.inf
    below = [p for p in usable if p.throughput_rps <= rate_rps]
    above = [p for p in usable if p.throughput_rps >= rate_rps]
    if not below:
        return usable[0].p99_ms
    if not above:
        return usable[-1].p99_ms
    lo, hi = below[-1], above[0]
    if hi.throughput_rps == lo.throughput_rps:
        return lo.p99_ms
    share = (rate_rps - lo.throughput_rps) / (hi.throughput_rps - lo.throughput_rps)
    return lo.p99_ms + share * (hi.p99_ms - lo.p99_ms)


def choose_unit(demand: Demand, units: list[Unit], machines: Machines) -> tuple[Unit, float]:
    """The cheapest unit within budget meeting the objective, and one replica's capacity."""
    fits = []
    for unit in units:
        if unit.model != demand.model or unit.quality_loss > demand.max_quality_loss:
            continue
        capacity = unit.capacity_rps(demand.p99_ms) * machines.cores / unit.cores
        if capacity > 0:
            replicas = math.ceil(demand.rate_rps / capacity)
            fits.append((replicas, replicas * unit.memory_bytes, unit.quality_loss, unit, capacity))
    if not fits:
        raise PlanError(_unreachable(demand, units))
    best = min(fits, key=lambda f: f[:3])
    return best[3], best[4]


def _unreachable(demand: Demand, units: list[Unit]) -> str:
    mine = [u for u in units if u.model == demand.model]
    within = [u for u in mine if u.quality_loss <= demand.max_quality_loss]
    where = f"models.{demand.model}"
    if not within:
        least = min((u.quality_loss for u in mine), default=math.inf)
        return (
            f"{where}.max_quality_loss = {demand.max_quality_loss:g}: no profiled unit is "
            f"within it (the least loss is {least:g}); raise it, or make a closer variant"
        )
    fastest = min((u.lowest_p99_ms() for u in within), default=math.inf)
    return (
        f"{where}.p99_ms = {demand.p99_ms:g}: no unit within the quality budget reaches it "
        f"(the lowest measured p99 is {fastest:.2f} ms); raise p99_ms to at least "
        f"{math.ceil(fastest * 100) / 100:g}, allow more quality loss, or profile faster "
        "variants or batching settings with `slimserve profile`"
    )


def plan(demands: list[Demand], units: list[Unit], machines: Machines) -> Plan:
    """Variants, replicas and placement for the whole workload (see the module doc)."""
    chosen = {d.model: choose_unit(d, units, machines) for d in demands}
    models = []
    for d in demands:
        unit, capacity = chosen[d.model]
        replicas = math.ceil(d.rate_rps / capacity)
        if replicas > machines.count:
            raise PlanError(
                f"models.{d.model}.rate_rps = {d.rate_rps:g} needs {replicas} replicas of "
                f"{_served(unit)} ({capacity:.0f} requests/s each within {d.p99_ms:g} ms) but "
                f"there are {machines.count} machines (one replica each); raise "
                f"machines.count to {replicas}, or relax p99_ms or max_quality_loss"
            )
        per_replica = d.rate_rps / replicas
        p99 = unit.p99_at(per_replica * unit.cores / machines.cores, d.p99_ms)
        serving = unit.service.serving if unit.service is not None else None
        models.append(
            ModelPlan(
                d.model,
                unit.variant,
                replicas,
                capacity,
                d.rate_rps,
                p99,
                unit.memory_bytes,
                serving,
            )
        )
    return Plan(models, place(models, machines))


def place(models: list[ModelPlan], machines: Machines) -> list[MachinePlan]:
    """AlpaServe-style greedy: most unserved load first, to the least-loaded machine that
    fits; ties go to the lower machine index (deterministic)."""
    placed = [MachinePlan(i, machines.reserved_bytes) for i in range(machines.count)]
    left = {m.model: m.replicas for m in models}
    unserved = {m.model: m.rate_rps for m in models}
    by_name = {m.model: m for m in models}
    while any(left.values()):
        name = max((n for n in left if left[n]), key=lambda n: (unserved[n], n))
        m = by_name[name]
        load = m.per_replica_rps / m.capacity_rps
        room = [
            mp
            for mp in placed
            if mp.memory_bytes + m.memory_bytes <= machines.memory_bytes
            and mp.utilization + load <= 1.0 + 1e-9
            and all(u[0] != name for u in mp.units)
        ]
        if not room:
            done = m.replicas - left[name]
            raise PlanError(
                f"machines: no machine has room for replica {done + 1} of {name} "
                f"({m.memory_bytes / 2**20:.1f} MiB, {load:.0%} of a machine's compute); "
                "raise machines.count or machines.memory_gb, or relax the objectives"
            )
        target = min(room, key=lambda mp: (mp.utilization, mp.index))
        target.units.append((name, m.variant, m.per_replica_rps))
        target.memory_bytes += m.memory_bytes
        target.utilization += load
        left[name] -= 1
        unserved[name] -= m.per_replica_rps
    return placed


def _served(unit: Unit) -> str:
    return unit.model if unit.variant is None else f"{unit.model}:{unit.variant}"
