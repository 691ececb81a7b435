"""The native gRPC server, before against after a change, interleaved in one session.

    python benchmarks/grpc_ab.py --repository /tmp/bm --before /tmp/base/src --after src \
        [--rounds 3] [--duration 6] [--concurrency 1,64]

`--before` and `--after` are two copies of slimserve's `src/` (e.g. `git archive main src`
unpacked in /tmp). Each round starts `slimserve serve` from one, then the other (order
alternating), drives the same MLP model over gRPC with `slimserve bench` (bench's own lean
HTTP/2 client, from `--after`), and reads the server's CPU time from /proc around the measured
load. Per side it prints req/s, p50/p99 and the server's CPU microseconds per call; at the end
the medians over rounds and after/before ratios. On a shared machine the ratios within a
round are what to compare, and CPU per call is steadier than req/s (it includes the server's
idle CPU while bench starts, the same for both sides).
Needs benchmarks/models.py's repository (`mlp-onnx`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from procs import free_port, start, stop, wait_answer

TICK_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK_S


def one_side(src: Path, after: Path, repo: Path, args: argparse.Namespace) -> list[dict]:
    """Serve from `src`, bench every concurrency; one dict per concurrency."""
    http, grpc_port = free_port(), free_port()
    env = {"PYTHONPATH": str(src.resolve())}
    cmd = [sys.executable, "-m", "slimserve", "serve", "--repository", str(repo),
           "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc_port),
           "--log-level", "warning"]  # fmt: skip
    log = Path(tempfile.gettempdir()) / f"grpc_ab_{http}.log"
    server = start(cmd, log, env)
    rows = []
    try:
        wait_answer(server, f"http://127.0.0.1:{http}/v2/health/ready", b"", 120, method="GET")
        for n in args.concurrency.split(","):
            bench = [sys.executable, "-m", "slimserve", "bench", "--url", f"http://127.0.0.1:{http}",
                     "--grpc-url", f"127.0.0.1:{grpc_port}", "--model", "mlp-onnx",
                     "--protocol", "grpc", "--concurrency", n, "--duration", str(args.duration),
                     "--warmup", str(args.warmup), "--json"]  # fmt: skip
            # The server's CPU over the whole bench run (its start, on a loaded machine, takes
            # seconds of no load), divided by the calls of the measured window: with no
            # warm-up (--warmup 0, the default here) that window is all the load there was.
            c0 = cpu_s(server.pid)
            proc = subprocess.Popen(
                bench, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(after)}
            )
            out, _ = proc.communicate(timeout=300)
            c1 = cpu_s(server.pid)
            result = json.loads(out)[0]
            calls = result["rps"] * result["duration_s"]
            result["server_cpu_us"] = (c1 - c0) / calls * 1e6 if calls else float("nan")
            rows.append(result)
    finally:
        stop(server)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--concurrency", default="1,64")
    args = p.parse_args()
    after = args.after.resolve()
    print(f"# {time.strftime('%FT%TZ', time.gmtime())} load {os.getloadavg()}")
    got: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        order = [("before", args.before), ("after", args.after)]
        for side, src in order if r % 2 == 0 else order[::-1]:
            for row in one_side(src, after, args.repository, args):
                got.setdefault((side, row["concurrency"]), []).append(row)
                print(f"round {r + 1} {side:6} c={row['concurrency']:3} {row['rps']:8.0f} req/s "
                      f"p50 {row['p50_ms']:.3f} p99 {row['p99_ms']:.3f} ms "
                      f"server {row['server_cpu_us']:.0f} us/call", flush=True)  # fmt: skip
    print("\nmedians (after/before):")
    for n in sorted({c for _, c in got}):
        med = {
            side: {k: statistics.median(r[k] for r in got[(side, n)])
                   for k in ("rps", "p50_ms", "p99_ms", "server_cpu_us")}
            for side in ("before", "after")
        }  # fmt: skip
        ratio = {k: med["after"][k] / med["before"][k] for k in med["after"]}
        print(f"c={n}: " + "; ".join(
            f"{k} {med['before'][k]:.3f} -> {med['after'][k]:.3f} ({ratio[k]:.2f}x)" for k in ratio
        ))  # fmt: skip
    print(f"# load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
