"""Issue 4 proof: a failing runtime trips its breaker; fallback or fail fast; recovery.

    python benchmarks/failure.py --workdir /tmp/pressure/failure

Model `flaky`: the python backend serving `slimserve.testing:FailingRuntime`, which fails
every call while a fault file exists (model.yaml `model_args: {fail_file: ...}`; the runtime
runs in the server process, so a file is the switch), with an ONNX variant `fallback`.
Breaker: 5 consecutive failures open it for 2 s; 3 probe calls in half-open close it.
Two open-loop streams at 40 req/s each on one server, for 14 s: A allows degradation
(parameter degrade=true), B does not. The fault file exists from 2 s to 8 s. /metrics is
polled every 100 ms for the breaker state. Reports per stream and phase the outcomes, how fast
503s come back and their Retry-After, the breaker's transitions, and the time to recover.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pressure as P

from slimserve.bench.http_client import build_request, connect

WIDTH, RATE, FAULT_ON, FAULT_OFF, END = 16, 40.0, 2.0, 8.0, 14.0
BREAKER = {"consecutive_failures": 5, "open_s": 2.0, "probe_calls": 3}
STATES = {0.0: "closed", 1.0: "half_open", 2.0: "open"}


def build_repo(root: Path, fault: Path) -> None:
    P.write_toy_with_variant(
        root,
        "flaky",
        "slimserve.testing:FailingRuntime",
        {"fail_file": str(fault)},
        WIDTH,
        "fallback",
        {"latency_ms_batch1": 0.5, "agreement": 0.99},
        batching={"max_batch_size": 8, "max_queue_delay_ms": 1},
        breaker=BREAKER,
        degrade={"allow": False, "max_quality_loss": 2.0, "recover_s": 1.0},
    )


async def toggle(fault: Path, t0: float) -> None:
    await asyncio.sleep(max(0.0, t0 + FAULT_ON - time.perf_counter()))
    await asyncio.to_thread(fault.touch)
    await asyncio.sleep(max(0.0, t0 + FAULT_OFF - time.perf_counter()))
    await asyncio.to_thread(fault.unlink)


async def watch(port: int, t0: float) -> list[tuple[float, str]]:
    """Breaker state changes of flaky/1 (time since start, state)."""
    conn = await connect("127.0.0.1", port, keep_body=True)
    raw = build_request("GET", "127.0.0.1", port, "/metrics")
    changes: list[tuple[float, str]] = []
    while time.perf_counter() - t0 < END + 0.5:
        _, body = await conn.request(raw)
        m = P.parse_metrics(body.decode())
        state = STATES.get(m.get('slimserve_breaker_state{model="flaky",variant=""}', -1), "?")
        if not changes or changes[-1][1] != state:
            changes.append((time.perf_counter() - t0, state))
        await asyncio.sleep(0.1)
    conn.close()
    return changes


async def scenario(port: int, fault: Path) -> dict[str, Any]:
    a = P.infer_request(port, "flaky", P.json_infer(WIDTH, parameters={"degrade": True}))
    b = P.infer_request(port, "flaky", P.json_infer(WIDTH))
    t0 = time.perf_counter()
    results = await asyncio.gather(
        P.open_loop(port, a, RATE, END, keep_body=True),
        P.open_loop(port, b, RATE, END, keep_body=True),
        toggle(fault, t0),
        watch(port, t0),
    )
    return {"A": results[0], "B": results[1], "breaker": results[3]}


def classify(s: P.Sample) -> str:
    if s.status != 200:
        return str(s.status)
    _name, degraded = P.served(s.body)
    return "fallback" if degraded else "original"


def phase(t: float) -> str:
    return "healthy" if t < FAULT_ON else "fault" if t < FAULT_OFF else "cleared"


def stream_report(result: P.OpenLoopResult) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("healthy", "fault", "cleared"):
        samples = [s for s in result.samples if phase(s.sent) == name]
        refused = [s for s in samples if s.status == 503]
        out[name] = {
            "outcomes": dict(Counter(classify(s) for s in samples)),
            "503_p50_ms": P.pct([s.latency for s in refused], 50) * 1e3,
            "503_p99_ms": P.pct([s.latency for s in refused], 99) * 1e3,
            "retry_after_s": sorted({s.headers.get("retry-after", "-") for s in refused}),
        }
    originals = [
        s.sent for s in result.samples if s.sent >= FAULT_OFF and classify(s) == "original"
    ]
    out["recovered_after_s"] = min(originals) - FAULT_OFF if originals else None
    # Failures that reached the model: the ones that opened the breaker, then one failed
    # half-open probe per open_s while the fault lasts.
    out["failed_at_s"] = [round(s.sent, 2) for s in result.samples if s.status == 500]
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"`flaky` (FailingRuntime, fault file present from {FAULT_ON:g} s to {FAULT_OFF:g} s), "
        f"ONNX variant `fallback`; breaker {BREAKER}; two streams of {RATE:g} req/s for "
        f"{END:g} s: A with degrade=true, B without.",
        "",
        "| stream | phase | outcomes | 503 p50 / p99 ms | Retry-After (s) |",
        "|---|---|---|---|---|",
    ]
    for stream in ("A", "B"):
        for name in ("healthy", "fault", "cleared"):
            r = doc[stream][name]
            lines.append(
                f"| {stream} | {name} | {r['outcomes']} | {r['503_p50_ms']:.2f} / "
                f"{r['503_p99_ms']:.2f} | {', '.join(r['retry_after_s']) or '-'} |"
            )
    changes = ", ".join(f"{t:.1f} s {s}" for t, s in doc["breaker"])
    lines += [
        "",
        f"- breaker state of flaky/1 (polled every 100 ms): {changes}",
        f"- calls that reached the failing model (500), at s: A {doc['A']['failed_at_s']}, "
        f"B {doc['B']['failed_at_s']} (the first open the breaker; then one half-open probe "
        f"every open_s = {BREAKER['open_s']:g} s fails and re-opens it)",
        f"- back on the original after the fault cleared: A {doc['A']['recovered_after_s']:.2f} s,"
        f" B {doc['B']['recovered_after_s']:.2f} s",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pressure/failure"))
    args = ap.parse_args()
    facts = P.machine_facts()  # load average at the start
    repo, fault = args.workdir / "models", args.workdir / "fault"
    if repo.exists():
        import shutil

        shutil.rmtree(repo)
    fault.unlink(missing_ok=True)
    build_repo(repo, fault)
    with P.serve(repo, args.workdir / "server.log") as server:
        raw = P.run(scenario(server.port, fault))
    doc = {
        "facts": facts | {"loadavg_end": P.machine_facts()["loadavg"]},
        "A": stream_report(raw["A"]),
        "B": stream_report(raw["B"]),
        "breaker": raw["breaker"],
    }
    P.dump(args.workdir / "failure.json", doc)
    text = markdown(doc)
    (args.workdir / "failure.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
