"""The serving benchmark of issue 2, in one bounded run.

    python benchmarks/serving.py --workdir /tmp/bench-ws/serving [--duration 8] [--warmup 2]

In order, never two servers at once:
1. builds the models (benchmarks/models.py) and measures them in-process (inprocess.py);
2. starts the FastAPI baseline (one uvicorn worker) on a free port: cold start, idle memory,
   then `slimserve bench` over v2 JSON at 1, 8, 64 clients; stops it;
3. starts `slimserve serve` with the MLP alone (cold start and idle memory, as for the
   baseline); stops it;
4. starts `slimserve serve` with all models and runs `slimserve bench` on each over v2 JSON,
   binary HTTP and gRPC at 1, 8, 64 clients (MiniLM also at 16); stops it;
5. if py-spy is found, profiles the server at 64 MLP clients (http-json, grpc), unmeasured;
6. writes `serving.md` (markdown tables, ratios against the targets) and `serving.json`.
Every figure is from this one run, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402
from profile_summary import summarize as summarize_profile  # noqa: E402

PY = sys.executable
MLP_MODELS = ("mlp-onnx", "mlp-torch")


def write_mlp_request(path: Path) -> bytes:
    """One v2 JSON request: a (1, 784) FP32 row, the same bytes for every server."""
    x = np.random.default_rng(0).standard_normal(784).astype(np.float32)
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": x.tolist()}]
    }
    path.write_text(json.dumps(body))
    return path.read_bytes()


def run_bench(
    url: str,
    model: str,
    protocols: str,
    conc: str,
    args: argparse.Namespace,
    grpc: str | None = None,
    input_file: Path | None = None,
) -> list[dict[str, Any]]:
    cmd = [
        PY,
        "-m",
        "slimserve",
        "bench",
        "--url",
        url,
        "--model",
        model,
        "--protocol",
        protocols,
        "--concurrency",
        conc,
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--json",
    ]
    if grpc:
        cmd += ["--grpc-url", grpc]
    if input_file:
        cmd += ["--input-file", str(input_file)]
    cells = len(protocols.split(",")) * len(conc.split(","))
    limit = cells * (args.duration + args.warmup + 40) + 30
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    if not done.stdout.strip().startswith("["):
        raise RuntimeError(f"bench failed ({done.returncode}): {done.stderr[-2000:]}")
    print(f"  bench {model} {protocols} @ {conc}: done", flush=True)
    return [dict(r, model=model) for r in json.loads(done.stdout)]


def cold_start(
    cmd: list[str],
    url: str,
    body: bytes,
    log: Path,
    env: dict[str, str] | None = None,
    ready_urls: tuple[str, ...] = (),
) -> tuple[Any, dict[str, float]]:
    """Start a server; seconds to its first good answer, then until every `ready_urls` answers
    200 (models still loading in the background would disturb the first measurements); idle
    RSS 1 s after that."""
    t0 = time.perf_counter()
    proc = procs.start(cmd, log, env)
    try:
        procs.wait_answer(proc, url, body, timeout=120)
        facts = {"cold_start_s": time.perf_counter() - t0}
        for ready in ready_urls:
            procs.wait_answer(proc, ready, b"", timeout=300, method="GET")
        facts["all_ready_s"] = time.perf_counter() - t0
        time.sleep(1.0)
        facts["idle_rss_mb"] = procs.tree_rss_bytes(proc.pid) / 2**20
        return proc, facts
    except BaseException:
        procs.stop(proc)
        raise


def baseline(work: Path, body: bytes, req_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = procs.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        PY,
        "-m",
        "uvicorn",
        "baseline_fastapi:app",
        "--app-dir",
        str(HERE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
    ]
    env = {"MODEL": str(work / "repo" / "mlp-onnx" / "1" / "model.onnx")}
    proc, facts = cold_start(
        cmd, f"{url}/v2/models/mlp-onnx/infer", body, work / "baseline.log", env
    )
    try:
        rows = run_bench(url, "mlp-onnx", "http-json", args.concurrency, args, input_file=req_file)
        facts["wrk"] = wrk_64(f"{url}/v2/models/mlp-onnx/infer", req_file, args)
    finally:
        procs.stop(proc)
    return {**facts, "rows": rows}


def wrk_64(url: str, req_file: Path, args: argparse.Namespace) -> dict[str, float] | None:
    """The same JSON request with wrk at 64 connections, to cross-check our own client."""
    if not args.wrk:
        return None
    r = procs.run_wrk(
        args.wrk, url, req_file, 64, args.warmup + args.duration, HERE / "wrk_post.lua"
    )
    print("  wrk @ 64: done", flush=True)
    return r


def serve_cmd(repo: Path, http: int, grpc: int, threads: int) -> list[str]:
    return [
        PY,
        "-m",
        "slimserve",
        "serve",
        "--repository",
        str(repo),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--log-level",
        "warning",
        "--intra-op-threads",
        str(threads),
    ]


def slimserve_mlp_only(work: Path, body: bytes, args: argparse.Namespace) -> dict[str, Any]:
    """Cold start and idle memory of slimserve serving the MLP alone (as the baseline does)."""
    repo = work / "repo-mlp"
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(work / "repo" / "mlp-onnx", repo / "mlp-onnx")
    port = procs.free_port()
    proc, facts = cold_start(
        serve_cmd(repo, port, procs.free_port(), args.intra_op_threads),
        f"http://127.0.0.1:{port}/v2/models/mlp-onnx/infer",
        body,
        work / "slimserve-mlp.log",
    )
    procs.stop(proc)
    return facts


def slimserve_all(
    work: Path, body: bytes, req_file: Path, args: argparse.Namespace, names: list[str]
) -> dict[str, Any]:
    http, grpc = procs.free_port(), procs.free_port()
    url = f"http://127.0.0.1:{http}"
    proc, facts = cold_start(
        serve_cmd(work / "repo", http, grpc, args.intra_op_threads),
        f"{url}/v2/models/mlp-onnx/infer",
        body,
        work / "slimserve.log",
        ready_urls=tuple(f"{url}/v2/models/{name}/ready" for name in names),
    )
    rows: list[dict[str, Any]] = []
    try:
        for name in names:
            is_mlp = name in MLP_MODELS
            conc = args.concurrency if is_mlp else args.minilm_concurrency
            rows += run_bench(
                url,
                name,
                args.protocols,
                conc,
                args,
                grpc=f"127.0.0.1:{grpc}",
                input_file=req_file if is_mlp else None,
            )
        facts["loaded_rss_mb"] = procs.tree_rss_bytes(proc.pid) / 2**20
        facts["wrk"] = wrk_64(f"{url}/v2/models/mlp-onnx/infer", req_file, args)
        if args.py_spy:
            facts["profiles"] = {
                p: profile(work, proc.pid, url, f"127.0.0.1:{grpc}", req_file, args, p)
                for p in ("http-json", "grpc")
            }
    finally:
        code = procs.stop(proc)
    facts["exit_code"] = code
    return {**facts, "rows": rows}


def profile(
    work: Path,
    pid: int,
    url: str,
    grpc: str,
    req_file: Path,
    args: argparse.Namespace,
    protocol: str,
) -> str:
    """py-spy on the server while `slimserve bench` drives the MLP at 64 clients (a separate,
    unmeasured run: sampling costs CPU on a 2-core machine)."""
    out = work / f"profile-{protocol}.txt"
    cmd = [
        PY,
        "-m",
        "slimserve",
        "bench",
        "--url",
        url,
        "--grpc-url",
        grpc,
        "--model",
        "mlp-onnx",
        "--protocol",
        protocol,
        "--concurrency",
        "64",
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--input-file",
        str(req_file),
    ]
    bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert bench.stdout is not None
        bench.stdout.readline()  # its first line comes once it has started (imports done)
        time.sleep(args.warmup + 0.5)  # past the probe and the warm-up
        spy = [
            args.py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(args.duration)),
            "--rate",
            "200",
            "--threads",
            # Python frames only: grpc.aio's Cython internals and uvloop's C code show as the
            # self time of the frame that runs the loop (`run (asyncio)`).
            "--nonblocking",
            "--format",
            "raw",
            "-o",
            str(out),
        ]
        subprocess.run(spy, check=True, timeout=args.duration + 60, capture_output=True)
    finally:
        bench.communicate(timeout=args.duration + args.warmup + 60)
    print(f"  profile {protocol}: done", flush=True)
    return summarize_profile(out.read_text())


def inprocess(work: Path, args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    out = work / "inprocess.json"
    cmd = [
        PY,
        str(HERE / "inprocess.py"),
        "--repository",
        str(work / "repo"),
        "--seconds",
        str(args.inprocess_seconds),
        "--models",
        ",".join(names),
        "--json",
        str(out),
        "--intra-op-threads",
        args.inprocess_threads,
    ]
    subprocess.run(cmd, check=True, timeout=300, stdout=subprocess.DEVNULL)
    results: dict[str, Any] = json.loads(out.read_text())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slimserve-bench"))
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--minilm-concurrency", default="1,8,16,64")
    parser.add_argument("--protocols", default="http-json,http-binary,grpc")
    parser.add_argument("--inprocess-seconds", type=float, default=0.5)
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="threads per model call, for the server and in-process alike "
        "(0: the framework's default, one per core)",
    )
    parser.add_argument(
        "--inprocess-threads",
        default="1,0",
        help="intra-op thread counts measured in-process; the ceiling is the best of them",
    )
    parser.add_argument("--wrk", default=shutil.which("wrk"), help="wrk executable (none: skip)")
    parser.add_argument(
        "--py-spy",
        default=shutil.which("py-spy"),
        help="py-spy executable: profile the server at 64 clients (none: skip)",
    )
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    names = ["mlp-onnx", "mlp-torch"] + ([] if args.no_minilm else ["minilm"])
    facts_before = report.machine_facts()
    models.build(work / "repo", minilm=not args.no_minilm)
    req_file = work / "mlp_request.json"
    body = write_mlp_request(req_file)
    print("in-process ...", flush=True)
    result: dict[str, Any] = {"inprocess": inprocess(work, args, names)}
    print("FastAPI baseline ...", flush=True)
    result["baseline"] = baseline(work, body, req_file, args)
    print("slimserve, MLP alone (cold start, memory) ...", flush=True)
    result["slimserve_mlp_only"] = slimserve_mlp_only(work, body, args)
    print("slimserve, all models ...", flush=True)
    result["slimserve"] = slimserve_all(work, body, req_file, args, names)
    result["machine"] = {**facts_before, "load_after": report.load_average()}
    result["settings"] = vars(args) | {"workdir": str(work), "wall_s": time.time() - t0}
    (work / "serving.json").write_text(json.dumps(result, indent=1, default=str))
    text = report.markdown(result)
    (work / "serving.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
