"""Scale-out figures on a real two-node Ray cluster on this machine (one CPU per node, inside
a private network namespace): slimserve alone against slimserve through Ray's proxy (one
replica), where the time goes through the proxy, slimserve's router against Ray's default on
many models (each replica's budget holds a third of them), and an autoscaling timeline with
where the time from the load step to the new replica's first answer goes.

    PYTHONPATH=src:. python benchmarks/ray_scaleout.py --seconds 15 --out benchmarks/ray_scaleout
    PYTHONPATH=src:. python benchmarks/ray_scaleout.py --seconds 15 --parts proxy,haproxy,routing
    PYTHONPATH=src:. python benchmarks/ray_scaleout.py --seconds 15 --parts routing    # ~4 min
    PYTHONPATH=src:. python benchmarks/ray_scaleout.py --parts autoscale               # ~2.5 min

Writes OUT.json (OUT_PARTS.json for other --parts) and OUT_autoscale.png; run as root
(network namespace).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.cluster.load import BODY
from tests.cluster.ray_cluster import METRICS_PORT, PrivateNetwork, RayCluster
from tests.e2e.conftest import build_repo, mlp_weights, write_mlp_onnx

SRC = Path(__file__).resolve().parents[1] / "src"
HTTP = "http://127.0.0.1:8000"
# Not Ray's default port: `ray start` refuses a port that a Ray of anyone's on this machine
# uses (it looks for the process, whatever its network namespace).
RAY_PORT = 6391
RAY = ("--ray", f"127.0.0.1:{RAY_PORT}", "--http-port", "8000")


def closed_loop(
    url: str, seconds: float, threads: int, bodies: list[tuple[str, Any]], shuffle: bool = False
) -> dict:
    """`threads` clients in a loop for `seconds`: req/s, p50/p99 ms, errors, per replica.
    Each client sends `bodies` in turn, or with `shuffle` one drawn at random each time."""
    lat: list[float] = []
    errors, replicas, paths, first = [0], {}, {}, {}  # type: ignore[var-annotated]
    lock, stop = threading.Lock(), time.monotonic() + seconds

    def run(offset: int) -> None:
        i, rng = offset, random.Random(offset)
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < stop:
                path, body = rng.choice(bodies) if shuffle else bodies[i % len(bodies)]
                i += threads
                t = time.perf_counter()
                try:
                    resp = client.post(path, json=body)
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    ok, resp = False, None
                with lock:
                    if ok:
                        lat.append(time.perf_counter() - t)
                        name = resp.headers.get("slimserve-replica", "-")  # type: ignore[union-attr]
                        replicas[name] = replicas.get(name, 0) + 1
                        first.setdefault(name, time.time())  # wall clock, as Ray's logs
                        per = paths.setdefault(name, {})
                        per[path] = per.get(path, 0) + 1
                    else:
                        errors[0] += 1

    pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    lat.sort()
    return {
        "requests": len(lat), "errors": errors[0], "req_s": len(lat) / seconds,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else None, "replicas": replicas,
        "paths_per_replica": paths, "first_answer_at": first,
    }  # fmt: skip


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_http(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready")


def wait_deployed(log: Path, timeout: float = 300) -> None:
    """Until the driver says the application is ready (Ray logs it once every replica runs).
    Not by asking through the proxy: Ray's router sends every request to the replica on the
    proxy's node while it has room, so the other one would never answer."""
    deadline = time.monotonic() + timeout
    while "is ready at" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"not deployed within {timeout} s: {log}")
        time.sleep(0.5)


def serve_cmd(repo: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "slimserve", "serve", "--repository", str(repo),
            "--grpc-port", "0", "--log-format", "text", *extra]  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(60)


def loads_per_replica(settle_s: float = 4.0) -> dict[str, float]:
    """slimserve_model_loads of every replica, from the nodes' Prometheus ports (each replica
    copies its metrics into Ray's, which every node exports: cluster.ray_metrics), after
    `settle_s` for the last counts to get there. Not through the proxy: its router would ask
    only the replicas it picks (Ray's, the one on the proxy's node)."""
    time.sleep(settle_s)
    out: dict[str, float] = {}
    for port in (METRICS_PORT, METRICS_PORT + 1):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for labels, value in re.findall(
            r"^ray_slimserve_model_loads_total\{([^}]*)\} (\S+)$", text, re.M
        ):
            name = re.search(r'replica="([^"]+)"', labels)
            if name:
                out[name.group(1)] = max(out.get(name.group(1), 0.0), float(value))
    return out


def proxy_time(repo: Path, work: Path, env: dict[str, str], seconds: float) -> dict:
    """Alone vs through Ray with one replica, one client at a time and 8 at once; the
    replica's own time per request from Ray's replica log (what the proxy adds is the rest)."""
    alone = start(serve_cmd(repo, "--http-port", "8100", "--load-models", "mlp"),
                  work / "alone.log", env)  # fmt: skip
    wait_http("http://127.0.0.1:8100/v2/health/ready")
    body = [("/v2/models/mlp/infer", BODY)]
    result = {"alone": {c: closed_loop("http://127.0.0.1:8100", seconds, c, body) for c in (1, 8)}}
    stop(alone)
    cmd = serve_cmd(repo, *RAY, "--replicas", "1", "--load-models", "mlp")
    ray_run = start(cmd, work / "ray1.log", env)
    wait_http(f"{HTTP}/v2/health/ready")
    result["ray_1_replica"] = {c: closed_loop(HTTP, seconds, c, body) for c in (1, 8)}
    session = re.search(r"(/tmp/ray/session_[^/\s]+)", (work / "head.log").read_text())
    assert session, "the head node's log names no session folder"
    logs = sorted(Path(session.group(1), "logs", "serve").glob("replica_*.log"),
                  key=lambda p: p.stat().st_mtime)  # fmt: skip
    inside = [float(m) for m in re.findall(r"POST / 200 ([\d.]+)ms", logs[-1].read_text())]
    result["replica_handling_ms_median"] = statistics.median(inside) if inside else None
    stop(ray_run)
    return result


def haproxy_time(repo: Path, work: Path, env: dict[str, str], seconds: float) -> dict:
    """Through Ray with one replica in Ray's HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY=1 on the
    nodes: HAProxy listens on the HTTP port and forwards to the replica's own HTTP port,
    skipping the Python proxy); a fresh cluster, since the nodes read the setting at start."""
    # HAProxy's default maxconn (20,000) asks for more file descriptors than the hard limit
    # here (20,000) allows, and HAProxy then refuses to start.
    env = dict(env, RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_HAPROXY_MAXCONN="4096")
    hwork = work / "haproxy"
    hwork.mkdir()
    cluster = RayCluster(hwork, RAY_PORT, env)
    body = [("/v2/models/mlp/infer", BODY)]
    try:
        cluster.start()
        # Ray's router: HAProxy balances by itself, and Ray refuses a custom router with it.
        one = ("--replicas", "1", "--load-models", "mlp", "--ray-router", "ray")
        cmd = serve_cmd(repo, *RAY, *one)
        proc = start(cmd, hwork / "ray1.log", env)
        try:
            wait_http(f"{HTTP}/v2/health/ready")
            return {c: closed_loop(HTTP, seconds, c, body) for c in (1, 8)}
        finally:
            stop(proc)
    except RuntimeError as exc:
        return {"error": str(exc)}
    finally:
        cluster.stop()


def routing(
    repo: Path, work: Path, env: dict[str, str], seconds: float, models: int, clients: int
) -> dict:
    """Our router vs Ray's on `models` models, each replica's budget holding a third of them."""
    bodies = [(f"/v2/models/m{i}/infer", BODY) for i in range(models)]
    out = {}
    for router in ("slimserve", "ray"):
        cmd = serve_cmd(repo, *RAY, "--replicas", "2", "--load-models", "", "--ray-router",
                        router, "--memory-budget-bytes", str(BUDGET))  # fmt: skip
        proc = start(cmd, work / f"{router}.log", env)
        wait_http(f"{HTTP}/v2/health/ready")
        wait_deployed(work / f"{router}.log")  # both replicas up before the clock starts
        # Models drawn at random: in turn, any cache smaller than the set misses every time,
        # whatever the router. A warm-up first (every model loaded once, the proxy's and the
        # replicas' first calls made), not counted: the first run had paid for it alone.
        closed_loop(HTTP, min(5.0, seconds / 3), clients, bodies, shuffle=True)
        before = loads_per_replica()
        run = closed_loop(HTTP, seconds, clients, bodies, shuffle=True)
        loads = {k: v - before.get(k, 0.0) for k, v in loads_per_replica().items()}
        run["model_loads"] = loads
        run["hit_ratio"] = 1 - sum(loads.values()) / max(1, run["requests"])
        out[router] = run
        stop(proc)
    return out


def autoscale(cluster: RayCluster, repo: Path, work: Path, env: dict[str, str], out: Path) -> dict:
    """Replica count over time: idle, 45 s of 16 clients, then idle; and where the time from
    the load step to the second replica's first answer went (upscale_breakdown)."""
    cmd = serve_cmd(repo, *RAY, "--autoscale", "1,2", "--load-models", "mlp")
    proc = start(cmd, work / "auto.log", env)
    wait_http(f"{HTTP}/v2/health/ready")
    timeline: list[tuple[float, int]] = []
    t0 = time.monotonic()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            count = sum(len(node.replica_pids()) for node in cluster.nodes)
            timeline.append((time.monotonic() - t0, count))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(3)
    load_start, load_wall = time.monotonic() - t0, time.time()
    busy = closed_loop(HTTP, 45, 16, [("/v2/models/mlp/infer", BODY)])
    load_end = time.monotonic() - t0
    time.sleep(40)
    done.set()
    sampler.join()
    stop(proc)
    _plot(timeline, load_start, load_end, out)
    up = next((t for t, c in timeline if c >= 2 and t >= load_start), None)
    down = next((t for t, c in timeline if c == 1 and up is not None and t > up), None)
    return {"load_s": [load_start, load_end], "two_replicas_at_s": up, "back_to_one_at_s": down,
            "upscale_breakdown": upscale_breakdown(work, load_wall, busy["first_answer_at"]),
            "busy": busy, "timeline": timeline}  # fmt: skip


# What Ray's controller and replica logs say, in order, on the way to a new replica serving.
UPSCALE_STEPS = (
    ("decided", r"controller.* -- Upscaling .* from 1 to 2 replicas"),
    ("actor_requested", r"controller.* -- Starting Replica\(id='(?P<id>[^']+)'"),
    ("constructor_started", r"{id} -- Started initializing replica"),
    ("constructor_done", r"{id} -- Finished initializing replica"),
    ("running", r"controller.* -- Replica\(id='{id}'.* started successfully"),
)


def upscale_breakdown(work: Path, load_wall: float, first_answer: dict[str, float]) -> dict:
    """Seconds after the load step at which each UPSCALE_STEPS line was logged (the first after
    the step), and the new replica's first answer to a client: decided - 0 is Ray's metric
    push, look-back and upscale delay; actor_requested -> constructor_started is Ray placing
    the actor and starting its worker process (Python, Ray and slimserve imports);
    constructor_started -> constructor_done is slimserve building the server and loading its
    models; -> running is the controller noticing; -> first_answer is the proxy learning of
    it and routing to it."""
    session = re.search(r"(/tmp/ray/session_[^/\s]+)", (work / "head.log").read_text())
    if not session:
        return {"error": "the head node's log names no session folder"}
    logs = Path(session.group(1), "logs", "serve")
    lines = []
    for log in logs.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            stamp = re.match(r"\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
            if stamp:
                when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
                lines.append((when.replace(tzinfo=UTC).timestamp(), line))
    lines.sort()
    out: dict[str, Any] = {}
    replica = ""
    for step, pattern in UPSCALE_STEPS:
        regex = re.compile(pattern.format(id=re.escape(replica) if replica else "\\S+"))
        found = next(((t, m) for t, line in lines if t >= load_wall - 1
                      for m in [regex.search(line)] if m), None)  # fmt: skip
        if found is None:
            break
        out[step] = round(found[0] - load_wall, 2)
        replica = found[1].groupdict().get("id") or replica
    if replica in first_answer:
        out["first_answer"] = round(first_answer[replica] - load_wall, 2)
    out["replica"] = replica
    return out


def _plot(timeline: list[tuple[float, int]], load_start: float, load_end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.step([t for t, _ in timeline], [c for _, c in timeline], where="post")
    ax.axvspan(load_start, load_end, alpha=0.2, label="16 clients")
    ax.set_xlabel("seconds")
    ax.set_ylabel("replicas")
    ax.set_yticks([0, 1, 2])
    ax.legend()
    ax.set_title("slimserve --ray --autoscale 1,2")
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "_autoscale.png"), dpi=100)


BUDGET = 0  # set in main from a measured model size


def main() -> None:
    global BUDGET
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--models", type=int, default=6)
    # A model in use cannot be evicted: with a budget of two models per replica, more clients
    # than that make loads fail (503, no room) rather than wait.
    parser.add_argument("--routing-clients", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/ray_scaleout"))
    parser.add_argument("--parts", default="proxy,routing,autoscale",
                        help="of proxy,routing,autoscale,haproxy (Ray's HAProxy mode)")  # fmt: skip
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    repo = build_repo(work / "models").root
    shutil.rmtree(repo / "broken")
    for i in range(args.models):
        (repo / f"m{i}").mkdir()
        (repo / f"m{i}" / "model.yaml").write_text((repo / "mlp" / "model.yaml").read_text())
        write_mlp_onnx(repo / f"m{i}" / "1" / "model.onnx", mlp_weights(10 + i))
    env = dict(os.environ, PYTHONPATH=f"{SRC}", OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_metrics_report_interval_ms="1000")  # fmt: skip
    network = PrivateNetwork()
    cluster = RayCluster(work, RAY_PORT, env)
    results: dict[str, Any] = {"uptime": os.getloadavg()}
    try:
        cluster.start()
        parts = set(args.parts.split(","))
        if "proxy" in parts:
            results["proxy"] = proxy_time(repo, work, env, args.seconds)
        if "routing" in parts:
            size = _unit_bytes(repo, work, env)
            BUDGET = third_budget(size, _folder_bytes(repo / "m0" / "1"), args.models)
            results["unit_bytes"], results["budget_bytes"] = size, BUDGET
            results["routing"] = routing(
                repo, work, env, args.seconds, args.models, args.routing_clients
            )
        if "autoscale" in parts:
            results["autoscale"] = autoscale(cluster, repo, work, env, args.out)
        cluster.stop()
        if "haproxy" in parts:
            results["haproxy_1_replica"] = haproxy_time(repo, work, env, args.seconds)
    finally:
        cluster.stop()
        network.leave()
    name = "" if args.parts == "proxy,routing,autoscale" else "_" + args.parts.replace(",", "_")
    args.out.with_name(args.out.name + name + ".json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "autoscale"}, indent=1))
    print({k: v for k, v in results.get("autoscale", {}).items() if k != "timeline"})


def third_budget(size: int, folder: int, models: int) -> int:
    """A budget holding a third of `models` models of `size` resident bytes, and room to load
    one more in place of one of them: a load reserves the model's bytes on disk (`folder`)
    until its resident size is known (serving.models), so k resident models and a load need
    (k - 1) x size + folder; k + 1 resident must not fit."""
    k = max(1, models // 3)
    low, high = (k - 1) * size + max(folder, size), (k + 1) * size
    assert low < high, "the model's files are too large against its resident size"
    return (low + high) // 2


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _unit_bytes(repo: Path, work: Path, env: dict[str, str]) -> int:
    """Resident bytes of one small model, as the server's residency counts it."""
    proc = start(
        serve_cmd(repo, "--http-port", "8101", "--load-models", "m0"), work / "size.log", env
    )
    wait_http("http://127.0.0.1:8101/v2/health/ready")
    size = httpx.get("http://127.0.0.1:8101/v2/health/status").json()["resident_bytes"]
    stop(proc)
    return int(size)


if __name__ == "__main__":
    main()
