"""Issue 4 proof: degradation to a cheaper variant under overload, and back with hysteresis.

    python benchmarks/degradation.py --workdir /tmp/pressure/degradation

Model `slow`: the python backend serving `slimserve.testing:SlowRuntime` (20 ms per batch,
batches of 1: 50 req/s at most), with an ONNX variant `fast` (an MLP 16 -> 16, ~1 ms) whose
variant.yaml profile says latency_ms_batch1: 1, agreement: 0.99 (1 point given up). model.yaml:
`degrade: {allow: true, max_quality_loss: 2, queue_fraction: 0.25, recover_s: 2}`,
`limits: {max_queue_wait_ms: 60}`, `batching.max_queue_size: 8`.
One open loop per run: calm (10 req/s, 3 s), overload (3x the original's capacity, 8 s), calm
again (10 req/s, 6 s). Two runs on one server: requests allowing degradation (the model's
default), then the same load with the parameter degrade=false (the control).
Reports per phase: share answered by the variant (response model_name `slow:fast`, parameters
`degraded: true`), refusals, p50/p99, and when traffic went back to the original.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pressure as P

WIDTH, DELAY_S, RECOVER_S = 16, 0.020, 2.0


def build_repo(root: Path) -> None:
    P.write_toy_with_variant(
        root,
        "slow",
        "slimserve.testing:SlowRuntime",
        {"delay_s": DELAY_S},
        WIDTH,
        "fast",
        {"latency_ms_batch1": 1.0, "agreement": 0.99},
        batching={"max_batch_size": 1, "max_queue_delay_ms": 0, "max_queue_size": 8},
        limits={"max_queue_wait_ms": 60},
        degrade={
            "allow": True,
            "max_quality_loss": 2.0,
            "queue_fraction": 0.25,
            "recover_s": RECOVER_S,
        },
    )


async def phases(port: int, degrade: bool, high: float) -> list[tuple[str, float, P.Sample]]:
    """(phase, phase start offset s, sample) for calm / overload / after."""
    params = None if degrade else {"degrade": False}
    raw = P.infer_request(port, "slow", P.json_infer(WIDTH, parameters=params))
    out: list[tuple[str, float, P.Sample]] = []
    offset = 0.0
    for name, rate, seconds in (("calm", 10.0, 3.0), ("overload", high, 8.0), ("after", 10.0, 6.0)):
        result = await P.open_loop(port, raw, rate, seconds, keep_body=True)
        out += [(name, offset, s) for s in result.samples]
        offset += seconds
    return out


def classify(sample: P.Sample) -> str:
    if sample.status != 200:
        return str(sample.status)
    name, degraded = P.served(sample.body)
    return "variant" if name == "slow:fast" and degraded else "original"


def report(rows: list[tuple[str, float, P.Sample]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase in ("calm", "overload", "after"):
        samples = [s for p, _, s in rows if p == phase]
        kinds = Counter(classify(s) for s in samples)
        ok = [s.latency for s in samples if s.status == 200]
        out[phase] = {
            "requests": len(samples),
            "outcomes": dict(kinds),
            "variant_share": kinds["variant"] / max(1, len(samples)),
            "p50_ms": P.pct(ok, 50) * 1e3,
            "p99_ms": P.pct(ok, 99) * 1e3,
        }
    after = [(off + s.sent, classify(s)) for p, off, s in rows if p == "after"]
    start = min((t for t, _ in after), default=0.0)
    last_variant = max((t for t, k in after if k == "variant"), default=None)
    first_orig = min((t for t, k in after if k == "original"), default=None)
    out["back_to_original_s"] = None if first_orig is None else first_orig - start
    out["last_variant_after_load_s"] = None if last_variant is None else last_variant - start
    out["after_tail_variant_share"] = float(
        np.mean([k == "variant" for t, k in after if t - start >= RECOVER_S + 1.0] or [0.0])
    )
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"Original `slow` (SlowRuntime, {DELAY_S * 1e3:.0f} ms per request, batch 1: "
        f"{1 / DELAY_S:.0f} req/s), variant `fast` (ONNX MLP 16-16); recover_s {RECOVER_S:g}; "
        f"overload {doc['overload_rps']:.0f} req/s for 8 s between calm phases of 10 req/s.",
        "",
        "| run | phase | requests | outcomes | variant share | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in ("degrade", "control"):
        for phase in ("calm", "overload", "after"):
            r = doc[run][phase]
            lines.append(
                f"| {run} | {phase} | {r['requests']} | {r['outcomes']} | "
                f"{r['variant_share'] * 100:.0f}% | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
            )
    d = doc["degrade"]
    lines += [
        "",
        f"- back to the original: first original answer {d['back_to_original_s']:.2f} s after "
        f"the load dropped; last variant answer at {d['last_variant_after_load_s']:.2f} s; "
        f"variant share after recover_s + 1 s: {d['after_tail_variant_share'] * 100:.0f}%",
        f"- target: overload p99 <= {doc['target_p99_ms']:.0f} ms (the original's unloaded p99 "
        f"x 2) -> {'met' if d['overload']['p99_ms'] <= doc['target_p99_ms'] else 'NOT met'} "
        f"({d['overload']['p99_ms']:.1f} ms)",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pressure/degradation"))
    ap.add_argument("--factor", type=float, default=3.0)
    args = ap.parse_args()
    facts = P.machine_facts()  # load average at the start
    repo = args.workdir / "models"
    if repo.exists():
        import shutil

        shutil.rmtree(repo)
    build_repo(repo)
    high = args.factor / DELAY_S
    with P.serve(repo, args.workdir / "server.log") as server:
        degrade = report(P.run(phases(server.port, True, high)))
        control = report(P.run(phases(server.port, False, high)))
        m = server.metrics()
    doc = {
        "facts": facts | {"loadavg_end": P.machine_facts()["loadavg"]},
        "overload_rps": high,
        "degrade": degrade,
        "control": control,
        "target_p99_ms": 2 * degrade["calm"]["p99_ms"],
        "server_degraded_total": P.metric(m, "slimserve_requests_degraded_total"),
        "server_shed_total": P.metric(m, "slimserve_requests_shed_total"),
    }
    P.dump(args.workdir / "degradation.json", doc)
    text = markdown(doc)
    (args.workdir / "degradation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
