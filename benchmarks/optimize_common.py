"""Helpers shared by the optimize reproductions: timing, machine facts, result files."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimserve.optimize.evaluation import machine_facts

OUT = Path(__file__).parent / "results"


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], runs: int = 30, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Median and p90 milliseconds of each function, timed in turn (round-robin) so that a
    neighbour's load on the shared machine falls on every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def block_medians(
    fns: dict[str, Callable[[], Any]], rounds: int = 20, block: int = 25, warmup: int = 5
) -> dict[str, dict[str, float]]:
    """Like `interleaved_medians`, but each turn is a block: `warmup` untimed calls, then
    `block` timed ones, so every call after the first few finds its model hot in the caches,
    as a server answering a stream of requests for one model does. The blocks still alternate
    (round-robin over `rounds`), so a neighbour's load falls on every variant alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def _summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    # min: the least disturbed call, the best estimate of the work itself on a busy machine
    return {
        k: {
            "p50_ms": float(np.median(v)),
            "p90_ms": float(np.percentile(v, 90)),
            "min_ms": float(np.min(v)),
        }
        for k, v in times.items()
    }


def facts(threads: int) -> dict[str, Any]:
    info = machine_facts(threads)
    info["load_average_now"] = [round(v, 2) for v in os.getloadavg()]
    return info


def save(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
