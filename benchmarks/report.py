"""Machine facts and the markdown report of benchmarks/serving.py."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from inprocess import markdown as inprocess_table

# Peers' idle memory and cold start as quoted in issue 2 (not measured here).
PEERS = (
    ("FastAPI (issue)", 256, 2),
    ("TorchServe (issue)", 684, 4),
    ("Ray Serve (issue)", 1600, 19),
)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu() -> tuple[str, list[str]]:
    model, flags = "unknown", []
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            if key.strip() == "flags" and not flags:
                flags = [x for x in value.split() if x.startswith(("avx512", "amx")) or "vnni" in x]
    return model, flags


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def machine_facts() -> dict[str, Any]:
    model, flags = _cpu()
    return {
        "cpu": model,
        "cpu_flags": " ".join(flags),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        **{
            p: _version(p)
            for p in (
                "torch",
                "onnxruntime",
                "numpy",
                "uvloop",
                "grpcio",
                "uvicorn",
                "fastapi",
                "transformers",
            )
        },
        "load_before": load_average(),
    }


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def serving_table(rows: list[dict[str, Any]], server: str) -> list[str]:
    out = []
    for r in rows:
        errors = sum(r["errors"].values())
        out.append(
            f"| {server} | {r['model']} | {r['protocol']} | {r['concurrency']} | {r['rps']:.0f} "
            f"| {_fmt(r['p50_ms'])} | {_fmt(r['p90_ms'])} | {_fmt(r['p99_ms'])} "
            f"| {_fmt(r['max_ms'])} | {errors} | {_fmt(r['client_cpu_us'], 0)} |"
        )
    return out


def _find(rows: list[dict[str, Any]], model: str, protocol: str, n: int) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in rows
            if r["model"] == model and r["protocol"] == protocol and r["concurrency"] == n
        ),
        None,
    )


def _best(inproc: dict[str, Any], model: str, key: str, pick: Any) -> float | None:
    """The best figure of a model's slimserve-runtime rows over the thread counts measured."""
    values = [r[key] for k, r in inproc.items() if k.startswith(f"{model} (slimserve runtime")]
    return pick(values) if values else None


def _ok(flag: bool) -> str:
    return "**met**" if flag else "not met"


def target_lines(res: dict[str, Any]) -> list[str]:
    base_rows, rows, inproc = res["baseline"]["rows"], res["slimserve"]["rows"], res["inprocess"]
    base = _find(base_rows, "mlp-onnx", "http-json", 64)
    out = [
        "| target | model | protocol | measured | target | verdict |",
        "|---|---|---|---:|---:|---|",
    ]
    protocols = sorted(
        {r["protocol"] for r in rows}, key=["http-json", "http-binary", "grpc"].index
    )
    for model in ("mlp-onnx", "mlp-torch"):
        for p in protocols:
            r = _find(rows, model, p, 64)
            if r and base and base["p99_ms"]:
                ratio, p99 = r["rps"] / base["rps"], r["p99_ms"] / base["p99_ms"]
                out.append(
                    f"| 64 clients: req/s vs FastAPI | {model} | {p} | {ratio:.2f}x | >= 6x "
                    f"| {_ok(ratio >= 6)} |"
                )
                out.append(
                    f"| 64 clients: p99 vs FastAPI | {model} | {p} | {p99:.2f} | < 0.20 "
                    f"| {_ok(p99 < 0.2)} |"
                )
    for model in ("mlp-onnx", "mlp-torch"):
        model_ms = _best(inproc, model, "batch1_ms", min)
        for p in protocols:
            r = _find(rows, model, p, 1)
            if r and model_ms is not None and r["p50_ms"] is not None:
                over = r["p50_ms"] - model_ms
                out.append(
                    f"| 1 client: p50 - model batch-1 time | {model} | {p} | {over:.3f} ms "
                    f"| <= 0.5 ms | {_ok(over <= 0.5)} |"
                )
    best = _best(inproc, "minilm", "best_rps", max)
    for p in protocols:
        r = _find(rows, "minilm", p, 16)
        if r and best:
            share = r["rps"] / best
            out.append(
                f"| 16 clients: share of in-process best batch | minilm | {p} "
                f"| {share:.0%} | >= 80% | {_ok(share >= 0.8)} |"
            )
    return out


def memory_lines(res: dict[str, Any]) -> list[str]:
    b, m, s = res["baseline"], res["slimserve_mlp_only"], res["slimserve"]
    out = [
        "| server | idle RSS MB | cold start s (process start to first good answer) |",
        "|---|---:|---:|",
        f"| FastAPI baseline, MLP (measured) | {b['idle_rss_mb']:.0f} | {b['cold_start_s']:.2f} |",
        f"| slimserve, MLP alone (measured) | {m['idle_rss_mb']:.0f} | {m['cold_start_s']:.2f} |",
        f"| slimserve, all benchmark models (measured; all loaded after "
        f"{s.get('all_ready_s', float('nan')):.2f} s) | {s['idle_rss_mb']:.0f} "
        f"| {s['cold_start_s']:.2f} |",
    ]
    out += [f"| {name} | {mb} | {sec} |" for name, mb, sec in PEERS]
    return out


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "#### Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cpus']} logical CPUs; flags: {m['cpu_flags'] or 'none'}",
        f"- kernel {m['kernel']}; Python {m['python']}; torch {m['torch']}; onnxruntime "
        f"{m['onnxruntime']}; numpy {m['numpy']}; transformers {m['transformers']}; uvicorn "
        f"{m['uvicorn']}; uvloop {m['uvloop']}; grpcio {m['grpcio']}; fastapi {m['fastapi']}",
        f"- load average (1, 5, 15 min) before: {m['load_before']}; after: {m['load_after']}",
        f"- settings: {res['settings']}",
        "",
        "#### In-process (each model alone, no server)",
        "",
        inprocess_table(res["inprocess"]),
        "",
        "#### Serving (closed loop, `slimserve bench`)",
        "",
        "| server | model | protocol | clients | req/s | p50 ms | p90 ms | p99 ms | max ms "
        "| errors | client us/req |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *serving_table(res["baseline"]["rows"], "FastAPI"),
        *serving_table(res["slimserve"]["rows"], "slimserve"),
        "",
        "#### Targets",
        "",
        *target_lines(res),
        "",
        "#### Idle memory and cold start",
        "",
        *memory_lines(res),
        "",
        *wrk_lines(res),
        "",
    ]
    for protocol, text in res["slimserve"].get("profiles", {}).items():
        lines += [
            f"#### Profile: slimserve, mlp-onnx, 64 clients, {protocol} (py-spy)",
            "",
            text,
            "",
        ]
    return "\n".join(lines)


def wrk_lines(res: dict[str, Any]) -> list[str]:
    """wrk and slimserve bench on the same server, model and JSON request, 64 connections."""
    out = [
        "#### Cross-check: wrk vs slimserve bench (mlp-onnx, v2 JSON, 64 connections)",
        "",
        "| server | client | req/s | p50 ms | p90 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, server in (("baseline", "FastAPI"), ("slimserve", "slimserve")):
        ours = _find(res[key]["rows"], "mlp-onnx", "http-json", 64)
        wrk = res[key].get("wrk")
        if ours:
            out.append(
                f"| {server} | slimserve bench | {ours['rps']:.0f} | {_fmt(ours['p50_ms'])} "
                f"| {_fmt(ours['p90_ms'])} | {_fmt(ours['p99_ms'])} |"
            )
        if wrk and "rps" in wrk:
            out.append(
                f"| {server} | wrk -t1 -c64 | {wrk['rps']:.0f} | {_fmt(wrk.get('p50_ms'))} "
                f"| {_fmt(wrk.get('p90_ms'))} | {_fmt(wrk.get('p99_ms'))} |"
            )
    return out
