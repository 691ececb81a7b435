"""Issue 4 proof: model residency under a memory budget, per eviction policy.

    python benchmarks/residency.py --workdir /tmp/pressure/residency [--requests 2000]

20 ONNX MLPs of different sizes (input 64 -> h -> h -> 16, h from 96 to 1024), whose weights
total 3x the server's memory budget. The same request sequence, model ranks drawn from a Zipf
distribution (s = 1.1, popularity independent of size), is sent one request at a time to a
real `slimserve serve` started cold (nothing preloaded), once per eviction policy (lru, lfu,
gdsf). One request at a time makes the accounting exact: every load is one miss, so
hit ratio = 1 - loads / requests, with loads and evictions read from /metrics. Writes
residency.json and residency.md in the workdir.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pressure as P

from slimserve.bench.http_client import connect

N_MODELS, WIDTH_IN, WIDTH_OUT = 20, 64, 16
POLICIES = ("lru", "lfu", "gdsf")


def build_repo(root: Path) -> dict[str, int]:
    """20 models m00..m19; sizes (bytes) by name. Hidden widths spread 96..1024."""
    widths = np.linspace(96, 1024, N_MODELS).astype(int)
    sizes = {}
    for i, h in enumerate(widths):
        name = f"m{i:02d}"
        sizes[name] = P.write_mlp(root / name / "1" / "model.onnx", [WIDTH_IN, h, h, WIDTH_OUT], i)
        P.write_yaml(
            root / name / "model.yaml",
            {
                "backend": "onnx",
                **P.io_spec(WIDTH_IN, WIDTH_OUT),
                "batching": {"max_batch_size": 8, "max_queue_delay_ms": 0},
            },
        )
    return sizes


def zipf_sequence(n: int, s: float, seed: int) -> list[str]:
    """Model names by Zipf rank; ranks are assigned to models in a seeded random order, so
    popularity does not follow size."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, N_MODELS + 1) ** s
    ranks = rng.choice(N_MODELS, size=n, p=p / p.sum())
    order = rng.permutation(N_MODELS)  # rank r -> model order[r]
    return [f"m{order[r]:02d}" for r in ranks]


async def drive(port: int, sequence: list[str]) -> list[float]:
    body, headers = P.binary_infer(WIDTH_IN)
    raws = {f"m{i:02d}": P.infer_request(port, f"m{i:02d}", body, headers) for i in range(N_MODELS)}
    conn = await connect("127.0.0.1", port)
    latencies = []
    try:
        for name in sequence:
            t = time.perf_counter()
            status, _ = await conn.request(raws[name])
            latencies.append(time.perf_counter() - t)
            if status != 200:
                raise RuntimeError(f"{name}: HTTP {status}")
    finally:
        conn.close()
    return latencies


def run_policy(repo: Path, work: Path, policy: str, budget: int, seq: list[str]) -> dict[str, Any]:
    extra = [
        "--load-models",
        "",
        "--memory-budget-bytes",
        str(budget),
        "--eviction-policy",
        policy,
        "--inference-threads",
        "1",
        "--intra-op-threads",
        "1",
        "--log-level",
        "info",  # the 'loaded ...' lines give the seconds and MiB of every load
    ]
    with P.serve(repo, work / f"server-{policy}.log", *extra) as server:
        t0 = time.perf_counter()
        lat = P.run(drive(server.port, seq))
        wall = time.perf_counter() - t0
        m = server.metrics()
    loads = P.metric(m, "slimserve_model_loads_total")
    load_s, load_mib = loaded_totals(work / f"server-{policy}.log")
    cold = [v for k, v in m.items() if k.startswith("slimserve_cold_load_seconds{")]
    return {
        "policy": policy,
        "requests": len(seq),
        "loads": int(loads),
        "evictions": int(P.metric(m, "slimserve_model_evictions_total")),
        "hit_ratio": 1.0 - loads / len(seq),
        "p50_ms": P.pct(lat, 50) * 1e3,
        "p99_ms": P.pct(lat, 99) * 1e3,
        "mean_ms": float(np.mean(lat)) * 1e3,
        "wall_s": wall,
        "load_seconds_total": load_s,
        "loaded_mib_total": load_mib,
        "resident_bytes_end": int(P.metric(m, "slimserve_resident_bytes")),
        "cold_load_ms_median": float(np.median(cold)) * 1e3 if cold else None,
        "cold_load_ms_max": float(np.max(cold)) * 1e3 if cold else None,
    }


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric field's median over the repeats (one policy)."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(np.median([r[key] for r in rows if r[key] is not None]))
    return out


LOADED = re.compile(r"loaded \S+ \(\w+\) in ([0-9.]+) s, ([0-9.]+) MiB")


def loaded_totals(log: Path) -> tuple[float, float]:
    """Seconds spent loading and MiB loaded, summed over the server's 'loaded ...' lines."""
    seconds = mib = 0.0
    for line in log.read_text(errors="replace").splitlines():
        found = LOADED.search(line)
        if found:
            seconds += float(found.group(1))
            mib += float(found.group(2))
    return seconds, mib


def markdown(rows: list[dict[str, Any]], total: int, budget: int, s: float, reps: int) -> str:
    lines = [
        f"20 models, {total / 2**20:.1f} MiB of weights, budget {budget / 2**20:.1f} MiB "
        f"({total / budget:.1f}x); Zipf s={s}; {int(rows[0]['requests'])} requests, one at a "
        f"time; medians over {reps} request sequences (seeds), each replayed to every policy.",
        "",
        "| policy | hit ratio | loads | evictions | MiB loaded | s loading | p50 ms | p99 ms | "
        "mean ms | cold load median / max ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['hit_ratio']:.3f} | {r['loads']:.0f} | {r['evictions']:.0f} | "
            f"{r['loaded_mib_total']:.0f} | {r['load_seconds_total']:.2f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.1f} | {r['mean_ms']:.2f} | "
            f"{r['cold_load_ms_median']:.1f} / {r['cold_load_ms_max']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pressure/residency"))
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--repeats", type=int, default=3, help="sequences (seeds); medians shown")
    args = ap.parse_args()
    facts = P.machine_facts()  # load average at the start
    policies = args.policies.split(",")
    repo = args.workdir / "models"
    if repo.exists():
        import shutil

        shutil.rmtree(repo)
    sizes = build_repo(repo)
    total = sum(sizes.values())
    budget = total // 3
    runs = []
    for rep in range(args.repeats):
        seq = zipf_sequence(args.requests, args.zipf_s, args.seed + rep)
        runs.append([run_policy(repo, args.workdir, p, budget, seq) for p in policies])
    rows = [median_row([run[i] for run in runs]) for i in range(len(policies))]
    doc = {
        "facts": facts | {"loadavg_end": P.machine_facts()["loadavg"]},
        "total_bytes": total,
        "budget_bytes": budget,
        "sizes": sizes,
        "zipf_s": args.zipf_s,
        "median": rows,
        "runs": runs,
    }
    P.dump(args.workdir / "residency.json", doc)
    text = markdown(rows, total, budget, args.zipf_s, args.repeats)
    (args.workdir / "residency.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
