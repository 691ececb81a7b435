"""`slimserve plan --repository R --workload W.yaml [--out DIR]`.

Reads every unit's measured sweep from the repository (`slimserve profile` writes it into
variant.yaml, or VERSION/profile.yaml for an original), plans with policies/planning.py, prints
the plan as a table and writes it as files the server takes:

  DIR/plan.yaml          the whole plan: per model the unit, replicas, expected p99 and
                         throughput; per machine the units, memory and compute share
  DIR/machine-N.yaml     settings for `slimserve serve --config DIR/machine-N.yaml` on
                         machine N: the repository, the planned units to load, the budget
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from slimserve.cli_parts import command
from slimserve.config import Settings
from slimserve.errors import ConfigError
from slimserve.planning.workload import GiB, Workload, load_workload
from slimserve.policies.planning import (
    Demand,
    Machines,
    Plan,
    PlanError,
    Point,
    Unit,
    plan,
)
from slimserve.policies.queueing import ServiceModel, from_profile, same_batching
from slimserve.repository.schema import VariantProfile
from slimserve.repository.store import Repository, Target

ABOUT = """plan variants, replicas and placement for a workload from measured profiles
From the workload (per model: rate_rps, p99_ms, max_quality_loss; machines: cores, memory_gb,
count) and the units' profiles (`slimserve profile`), choose per model the cheapest unit
meeting the objective within the quality budget and place its replicas; print a table and
write plan.yaml and machine-N.yaml (settings for `slimserve serve --config`).
"""


def register(subparsers: Any) -> None:
    p = command(subparsers, "plan", run, ABOUT)
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository")
    p.add_argument("--workload", type=Path, required=True, help="workload YAML file")
    p.add_argument("--out", type=Path, default=Path("plan"), help="folder for the plan files")


def run(args: argparse.Namespace) -> int:
    workload = load_workload(args.workload)
    repo = Repository(args.repository)
    result = make_plan(repo, workload, args.workload)
    print(format_plan(result))
    for path in write_plan(result, repo, workload, args.out):
        print(f"wrote {path}")
    return 0


def make_plan(repo: Repository, workload: Workload, source: Path) -> Plan:
    """The plan, or ConfigError naming the workload field at fault and the fix."""
    units: list[Unit] = []
    demands = []
    for name, load in workload.models.items():
        units.extend(_units(repo, name, load.version, source))
        demands.append(Demand(name, load.rate_rps, load.p99_ms, load.max_quality_loss))
    m = workload.machines
    machines = Machines(m.cores, int(m.memory_gb * GiB), m.count, int(m.reserved_memory_gb * GiB))
    try:
        return plan(demands, units, machines)
    except PlanError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _units(repo: Repository, name: str, version: int | None, source: Path) -> list[Unit]:
    if not repo.has_model(name):
        raise ConfigError(
            f"{source}: field 'models.{name}': no model '{name}' in the repository "
            f"{repo.root}; fix: use one of {', '.join(repo.model_names()) or '(none)'}"
        )
    versions = repo.versions(name)
    version = version or (versions[-1] if versions else None)
    if version is None or version not in versions:
        raise ConfigError(
            f"{source}: field 'models.{name}.version' = {version}: no such version; "
            f"fix: use one of {versions}"
        )
    targets = [repo.target(name, version)]
    targets += [repo.target(name, version, v) for v in repo.variants(name, version)]
    units = [u for u in (_unit(t) for t in targets) if u is not None]
    if not units:
        raise ConfigError(
            f"{source}: field 'models.{name}': no unit of {name}/{version} has a measured "
            f"sweep; fix: run `slimserve profile {name} --repository {repo.root}` (and "
            "--variant V for each variant worth considering)"
        )
    return units


def _unit(target: Target) -> Unit | None:
    """A unit the planner can weigh: it has a sweep and a known quality loss."""
    profile = target.profile
    if profile is None:
        return None
    rows = _sweep_rows(profile, target)
    points = tuple(Point(float(r["throughput_rps"]), float(r["p99_ms"])) for r in rows)
    loss = 0.0 if target.variant is None else profile.quality_loss()
    if not points or loss is None:
        return None
    extra = profile.model_extra or {}
    cores = int((extra.get("sweep_settings") or {}).get("cpu_count") or 1)
    memory = profile.memory_bytes or profile.size_bytes or 0
    service = _service(profile, target)
    return Unit(target.model, target.variant, loss, memory, points, cores, service)


def _sweep_rows(profile: VariantProfile, target: Target) -> list[dict[str, Any]]:
    """Closed-loop sweep points run with the batching the server will use."""
    batching = target.config.batching
    sweep = (profile.model_extra or {}).get("sweep")
    return same_batching(sweep, batching.max_batch_size, batching.max_queue_delay_ms)


def _service(profile: VariantProfile, target: Target) -> ServiceModel | None:
    """The unit's queueing model (policies/queueing.py), with its serving path."""
    batching = target.config.batching
    extra = profile.model_extra or {}
    curve = profile.latency_curve()
    return from_profile(extra, curve, batching.max_batch_size, batching.max_queue_delay_ms)


def _served(model: str, variant: str | None) -> str:
    return model if variant is None else f"{model}:{variant}"


def format_plan(result: Plan) -> str:
    lines = [
        f"{'model':<20}{'serve as':<26}{'replicas':>9}{'rps':>9}{'rps/replica':>12}"
        f"{'cap/replica':>12}{'exp p99 ms':>11}{'MiB/replica':>12}"
    ]
    for m in result.models:
        lines.append(
            f"{m.model:<20}{_served(m.model, m.variant):<26}{m.replicas:>9}{m.rate_rps:>9.0f}"
            f"{m.per_replica_rps:>12.0f}{m.capacity_rps:>12.0f}{m.expected_p99_ms:>11.2f}"
            f"{m.memory_bytes / 2**20:>12.1f}"
        )
    lines.append("")
    lines.append(f"{'machine':<9}{'memory MiB':>11}{'compute':>9}  units (requests/s)")
    for mp in result.machines:
        units = ", ".join(f"{_served(n, v)} ({r:.0f})" for n, v, r in mp.units) or "(idle)"
        lines.append(
            f"{mp.index:<9}{mp.memory_bytes / 2**20:>11.1f}{mp.utilization:>9.0%}  {units}"
        )
    return "\n".join(lines)


def plan_document(result: Plan) -> dict[str, Any]:
    return {
        "models": {
            m.model: {
                "serve_as": _served(m.model, m.variant),
                "variant": m.variant,
                "replicas": m.replicas,
                "expected_rps": round(m.rate_rps, 2),
                "expected_p99_ms": round(m.expected_p99_ms, 3),
                "capacity_rps_per_replica": round(m.capacity_rps, 2),
                "memory_bytes_per_replica": m.memory_bytes,
                "serving_path": None
                if m.serving is None
                else {
                    "extra_ms": round(m.serving.extra_ms, 3),
                    "per_request_ms": round(m.serving.per_request_ms, 4),
                },
            }
            for m in result.models
        },
        "machines": [
            {
                "index": mp.index,
                "memory_bytes": mp.memory_bytes,
                "compute_share": round(mp.utilization, 4),
                "units": [
                    {"serve_as": _served(n, v), "rate_rps": round(r, 2)} for n, v, r in mp.units
                ],
            }
            for mp in result.machines
        ],
    }


def machine_settings(
    result: Plan, repo: Repository, workload: Workload, index: int
) -> dict[str, Any]:
    """`slimserve serve --config` settings for one machine: only its planned units load."""
    versions = {n: m.version or repo.versions(n)[-1] for n, m in workload.models.items()}
    mp = result.machines[index]
    keys = [f"{n}/{versions[n]}" + (f":{v}" if v else "") for n, v, _ in mp.units]
    m = workload.machines
    data: dict[str, Any] = {
        "repository": str(repo.root),
        "load_models": keys,
        "pin_models": sorted({n for n, _, _ in mp.units}),
        "memory_budget_bytes": int((m.memory_gb - m.reserved_memory_gb) * GiB),
    }
    threads = {_intra_op_threads(repo, n, versions[n], v) for n, v, _ in mp.units} - {None}
    if len(threads) == 1:  # the profiles were measured with this many: serve the same way
        data["intra_op_threads"] = threads.pop()
    Settings(**data)  # the server must take it: fail here, not on the machine
    return data


def _intra_op_threads(repo: Repository, name: str, version: int, variant: str | None) -> int | None:
    """Threads inside one call the unit's sweep ran with (None: not recorded)."""
    profile = repo.target(name, version, variant).profile
    settings = (profile.model_extra or {}).get("sweep_settings") if profile is not None else None
    threads = (settings or {}).get("intra_op_threads")
    return threads if isinstance(threads, int) and threads > 0 else None


def write_plan(result: Plan, repo: Repository, workload: Workload, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "plan.yaml"]
    paths[0].write_text(yaml.safe_dump(plan_document(result), sort_keys=False))
    for mp in result.machines:
        path = out / f"machine-{mp.index}.yaml"
        settings = machine_settings(result, repo, workload, mp.index)
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        paths.append(path)
    return paths
