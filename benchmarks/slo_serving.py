"""Capacity plan and per-request objectives, measured on real servers (issue 12).

    PYTHONPATH=src python benchmarks/slo_serving.py [--quick]

1. A digits MLP (64-4096-4096-10, trained here) and two variants from `slimserve optimize`
   (bf16; structured:0.75+finetune), each profiled by `slimserve profile`.
2. Plan: a workload (rate, p99 objective, quality budget, one 2-core machine) planned by
   `slimserve plan`; the planned machine's settings served by `slimserve serve --config`
   and driven by `slimserve bench --rate` (open loop) at the workload's rate: measured p99 and
   throughput against the plan's.
3. Mixed traffic on one server holding every unit: an open loop at RATE, half of the requests
   with a tight objective. Three policies in the same run, one after the other, each on the
   same arrivals (same seed): per-request choice (the tight half sends latency_slo_ms and
   max_quality_loss), always the original, always the cheapest variant. Recorded for the tight
   half: share of answers within the objective (client-measured); for all: accuracy on the
   digits test labels of the answers served.

Writes benchmarks/results/slo_serving.json; RESULTS.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
import yaml
from safetensors.torch import save_file

from slimserve.bench.http_client import build_request, connect
from slimserve.bench.local_server import local_server
from slimserve.cli import main as slimserve
from slimserve.optimize.data import digits
from slimserve.optimize.pipeline import Options, optimize
from slimserve.repository import write_manifest
from slimserve.train import TrainConfig, classification_loss, fit
from slimserve.zoo import MLP

OUT = Path(__file__).parent / "results" / "slo_serving.json"
SIZES = [64, 4096, 4096, 10]
RECIPES = ["bf16", "structured:0.75+finetune:epochs=3"]
ENV = {"OMP_NUM_THREADS": "1"}


def build_repository(root: Path, epochs: int) -> Path:
    torch.manual_seed(0)
    x, y = digits("train")
    model = MLP(SIZES)
    config = TrainConfig(epochs=epochs, lr=1e-3, progress=False, batch_size=64)
    fit(model, classification_loss, (torch.from_numpy(x), torch.from_numpy(y)), config)
    version = root / "mlp" / "1"
    version.mkdir(parents=True)
    save_file(model.eval().state_dict(), str(version / "model.safetensors"))
    doc = {
        "backend": "torch",
        "model_class": "slimserve.zoo:MLP",
        "model_args": {"sizes": SIZES},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        "batching": {"max_batch_size": 16, "max_queue_delay_ms": 1},
    }
    (root / "mlp" / "model.yaml").write_text(yaml.safe_dump(doc))
    write_manifest(version)
    return root


def cli(*args: str) -> None:
    code = slimserve(list(args))
    if code != 0:
        raise SystemExit(f"slimserve {' '.join(args)} exited {code}")


def profiles(root: Path) -> dict[str, dict[str, Any]]:
    folder = root / "mlp" / "1"
    out = {"": yaml.safe_load((folder / "profile.yaml").read_text())["profile"]}
    for v in sorted(p.name for p in (folder / "variants").iterdir()):
        out[v] = yaml.safe_load((folder / "variants" / v / "variant.yaml").read_text())["profile"]
    return out


def point(profile: dict[str, Any], clients: int) -> dict[str, Any]:
    return next(p for p in profile["sweep"] if p["concurrency"] == clients)


# -- 2. the plan under its workload ---------------------------------------------------------


def run_plan(root: Path, work: Path, prof: dict[str, dict[str, Any]], args: Any) -> dict:
    base = point(prof[""], 4)  # the original with 4 clients sets the scale
    workload = {
        "machines": {"cores": os.cpu_count(), "memory_gb": 8, "count": 1},
        "models": {
            "mlp": {
                "rate_rps": round(base["throughput_rps"] * 0.6, 1),
                "p99_ms": round(base["p99_ms"], 2),
                "max_quality_loss": args.quality_budget,
            }
        },
    }
    wl = work / "workload.yaml"
    wl.write_text(yaml.safe_dump(workload))
    cli("plan", "--repository", str(root), "--workload", str(wl), "--out", str(work / "plan"))
    plan = yaml.safe_load((work / "plan" / "plan.yaml").read_text())["models"]["mlp"]
    settings = work / "plan" / "machine-0.yaml"
    with local_server(root, "--config", str(settings), env=ENV) as server:
        cmd = [
            sys.executable, "-m", "slimserve", "bench",
            "--url", f"http://127.0.0.1:{server.http_port}",
            "--model", plan["serve_as"], "--protocol", "http-binary",
            "--concurrency", "32", "--rate", str(workload["models"]["mlp"]["rate_rps"]),
            "--duration", str(args.duration), "--warmup", "1", "--json",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
    (measured,) = json.loads(done.stdout)
    return {
        "workload": workload,
        "plan": plan,
        "measured": {k: measured[k] for k in ("rps", "p50_ms", "p99_ms", "errors", "requests")},
        "p99_ratio": measured["p99_ms"] / plan["expected_p99_ms"],
        "rps_ratio": measured["rps"] / plan["expected_rps"],
    }


# -- 3. mixed traffic -------------------------------------------------------------------------


def bodies(tight: dict[str, Any] | None) -> tuple[list[bytes], np.ndarray]:
    x, y = digits("test")
    out = []
    for row in x:
        doc: dict[str, Any] = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}
            ]
        }
        if tight:
            doc["parameters"] = tight
        out.append(orjson.dumps(doc))
    return out, y


async def mixed_phase(
    port: int, models: tuple[str, str], params: dict | None, rate: float, args: Any
) -> dict[str, Any]:
    """Open loop at `rate`: even arrivals are the tight stream (to models[0], with `params`),
    odd ones plain (to models[1]); returns per-stream latencies, accuracy, variants."""
    host = "127.0.0.1"
    plain_bodies, labels = bodies(None)
    tight_bodies, _ = bodies(params)
    paths = [f"/v2/models/{m}/infer" for m in models]
    raw = {
        0: [build_request("POST", host, port, paths[0], b) for b in tight_bodies],
        1: [build_request("POST", host, port, paths[1], b) for b in plain_bodies],
    }
    pool: asyncio.Queue[Any] = asyncio.Queue()
    for _ in range(32):
        pool.put_nowait(await connect(host, port, keep_body=True))
    rng = np.random.default_rng(7)
    records: list[tuple[int, float, bool, str]] = []  # stream, ms, correct, variant
    start = time.perf_counter()
    warm_end, end = start + 1.0, start + 1.0 + args.duration

    async def one(i: int, scheduled: float) -> None:
        stream, row = i % 2, (i // 2) % len(labels)
        conn = await pool.get()
        try:
            status, body = await conn.request(raw[stream][row])
        finally:
            pool.put_nowait(conn)
        ms = (time.perf_counter() - scheduled) * 1e3
        if status != 200 or scheduled < warm_end:
            return
        doc = orjson.loads(body)
        correct = int(np.argmax(doc["outputs"][0]["data"])) == int(labels[row])
        records.append((stream, ms, correct, doc["model_name"]))

    tasks, t, i = [], start, 0
    while True:
        t += rng.exponential(1 / rate)
        if t >= end:
            break
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        tasks.append(asyncio.create_task(one(i, t)))
        i += 1
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait().close()
    return summarize(records, args.slo_ms)


def summarize(records: list[tuple[int, float, bool, str]], slo_ms: float) -> dict[str, Any]:
    tight = [r for r in records if r[0] == 0]
    every = np.array([r[1] for r in records])
    served: dict[str, int] = {}
    for r in tight:
        served[r[3]] = served.get(r[3], 0) + 1
    return {
        "requests": len(records),
        "tight_attainment": float(np.mean([r[1] <= slo_ms for r in tight])),
        "tight_p99_ms": float(np.percentile([r[1] for r in tight], 99)),
        "tight_accuracy": float(np.mean([r[2] for r in tight])),
        "all_accuracy": float(np.mean([r[2] for r in records])),
        "all_p99_ms": float(np.percentile(every, 99)),
        "tight_served_by": served,
    }


def run_mixed(root: Path, prof: dict[str, dict[str, Any]], args: Any) -> dict[str, Any]:
    cheapest = min((v for v in prof if v), key=lambda v: prof[v]["latency_ms_by_batch"]["1"])
    tight = {"latency_slo_ms": args.slo_ms, "max_quality_loss": args.quality_budget}
    policies = {
        "per-request": (("mlp", "mlp"), tight),
        "always-original": (("mlp", "mlp"), None),
        "always-cheapest": ((f"mlp:{cheapest}", f"mlp:{cheapest}"), None),
    }
    out: dict[str, Any] = {"cheapest": cheapest}
    with local_server(root, env=ENV) as server:
        for name, (models, params) in policies.items():
            out[name] = asyncio.run(mixed_phase(server.http_port, models, params, args.rate, args))
            print(name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20.0, help="mixed traffic, req/s")
    parser.add_argument("--slo-ms", type=float, default=0.0, help="0: from the profiles")
    parser.add_argument("--quality-budget", type=float, default=5.0)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.duration = 2, 3.0
    with tempfile.TemporaryDirectory(prefix="slo-bench-") as tmp:
        root = build_repository(Path(tmp) / "models", args.epochs)
        opts = Options(batch_sizes=(1, 4, 16), min_time_s=0.1, progress=False)
        optimize(root, "mlp", RECIPES, digits("train"), digits("test"), opts)
        sweep = ["--concurrency", "1,4,8", "--max-batch-size", "16", "--queue-delay-ms", "1"]
        sweep += ["--duration", str(args.duration / 4), "--warmup", "0.5", "--no-progress"]
        for variant in [None, *sorted(p.name for p in (root / "mlp/1/variants").iterdir())]:
            extra = [] if variant is None else ["--variant", variant]
            cli("profile", "mlp", "--repository", str(root), *extra, *sweep)
        prof = profiles(root)
        if not args.slo_ms:  # between the original's batch-1 latency and the fastest variant's,
            # plus the 1 ms batching delay: what the server predicts for a lone request
            one = {v: p["latency_ms_by_batch"]["1"] for v, p in prof.items()}
            fastest = min(ms for v, ms in one.items() if v)
            args.slo_ms = round(1.0 + (one[""] + fastest) / 2, 2)
        result = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "load_average_before": os.getloadavg(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "settings": vars(args),
            "profiles": {
                v or "(original)": {
                    k: p.get(k)
                    for k in ("latency_ms_by_batch", "agreement", "accuracy", "memory_bytes")
                }
                | {"sweep": p["sweep"]}
                for v, p in prof.items()
            },
            "plan": run_plan(root, Path(tmp), prof, args),
            "mixed": run_mixed(root, prof, args),
        }
        result["machine"]["load_average_after"] = os.getloadavg()
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    print(json.dumps({"plan": result["plan"], "mixed": result["mixed"]}, indent=1))


if __name__ == "__main__":
    main()
